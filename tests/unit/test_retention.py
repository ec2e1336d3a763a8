"""Retention: the keep/destroy grid, protections, and its properties.

Notation: ``timeline("2024-05-01T10:00 2024-05-01T11:00")`` builds snapshots named after
their creation time (UTC), guid = position, createtxg = 10 * position, oldest first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbackupd.core.model import Bookmark, Hold, Snapshot
from zbackupd.core.retention import (
    CLOCK_SLACK,
    ClockImplausible,
    RetentionInputError,
    RetentionPolicy,
    check_clock,
    protections,
    reference_time,
    select_for_destroy,
)
from zbackupd.errors import PermanentError


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def timeline(spec: str) -> list[Snapshot]:
    return [
        Snapshot(f"tank/fs@{stamp}", position, 10 * position, int(at(stamp).timestamp()))
        for position, stamp in enumerate(spec.split(), start=1)
    ]


def destroyed(
    spec: str, policy: RetentionPolicy, now: str, protect: frozenset[int] = frozenset()
) -> list[str]:
    result = select_for_destroy(timeline(spec), policy, now=at(now), protect=protect)
    return [snap.short_name for snap in result.destroy]


def test_nothing_in_nothing_out() -> None:
    result = select_for_destroy([], RetentionPolicy(keep_last=3), now=0)
    assert result.keep == ()
    assert result.destroy == ()


def test_keep_last() -> None:
    spec = "2024-05-01T01:00 2024-05-01T02:00 2024-05-01T03:00 2024-05-01T04:00"
    assert destroyed(spec, RetentionPolicy(keep_last=2), "2024-05-01T05:00") == [
        "2024-05-01T01:00",
        "2024-05-01T02:00",
    ]
    assert destroyed(spec, RetentionPolicy(keep_last=9), "2024-05-01T05:00") == []


def test_the_newest_is_kept_even_by_an_empty_policy() -> None:
    spec = "2024-05-01T01:00 2024-05-01T02:00 2024-05-01T03:00"
    result = select_for_destroy(timeline(spec), RetentionPolicy(keep_last=0), now=at("2025-01-01"))
    assert [(k.snapshot.short_name, k.reasons) for k in result.keep] == [
        ("2024-05-01T03:00", ("newest",))
    ]
    assert len(result.destroy) == 2


def test_hourly_keeps_the_newest_in_each_of_the_last_hours() -> None:
    spec = (
        "2024-05-01T09:10 2024-05-01T09:50 "
        "2024-05-01T10:10 2024-05-01T10:50 "
        "2024-05-01T11:10 2024-05-01T11:30 2024-05-01T11:50"
    )
    # now in hour 12 (no snapshot yet): the last 3 hours are 10, 11, 12.
    got = destroyed(spec, RetentionPolicy(keep_last=0, hourly=3), "2024-05-01T12:05")
    assert got == [
        "2024-05-01T09:10",
        "2024-05-01T09:50",
        "2024-05-01T10:10",
        "2024-05-01T11:10",
        "2024-05-01T11:30",
    ]


def test_daily_window_counts_back_from_now_including_empty_days() -> None:
    spec = " ".join(f"2024-05-{day:02d}T23:00" for day in range(1, 11))
    got = destroyed(spec, RetentionPolicy(keep_last=0, daily=2), "2024-05-11T20:00")
    # days 10 and 11 are the window; only the 10th has a snapshot
    assert got == [f"2024-05-{day:02d}T23:00" for day in range(1, 10)]


def test_the_window_never_starts_more_than_the_slack_after_the_newest_snapshot() -> None:
    """A day and a half after the newest snapshot the window ends at newest + 1 day
    (May 11 23:00): days 9, 10, 11 (anchored on the data, not on the clock)."""
    spec = " ".join(f"2024-05-{day:02d}T23:00" for day in range(1, 11))
    got = destroyed(spec, RetentionPolicy(keep_last=0, daily=3), "2024-05-12T08:00")
    assert got == [f"2024-05-{day:02d}T23:00" for day in range(1, 9)]


def test_daily_keeps_one_per_day() -> None:
    spec = "2024-05-01T01:00 2024-05-01T13:00 2024-05-02T01:00 2024-05-02T13:00"
    got = destroyed(spec, RetentionPolicy(keep_last=0, daily=7), "2024-05-02T14:00")
    assert got == ["2024-05-01T01:00", "2024-05-02T01:00"]


def test_weekly_weeks_start_on_monday() -> None:
    # 2024-05-05 is a Sunday, 2024-05-06 a Monday.
    spec = "2024-05-04T10:00 2024-05-05T10:00 2024-05-06T10:00 2024-05-07T10:00"
    got = destroyed(spec, RetentionPolicy(keep_last=0, weekly=2), "2024-05-08T00:00")
    assert got == ["2024-05-04T10:00", "2024-05-06T10:00"]


def test_monthly_and_yearly() -> None:
    spec = "2022-06-01T00:00 2023-01-15T00:00 2023-12-20T00:00 2024-01-02T00:00 2024-02-03T00:00"
    monthly = destroyed(spec, RetentionPolicy(keep_last=0, monthly=2), "2024-02-10T00:00")
    assert monthly == ["2022-06-01T00:00", "2023-01-15T00:00", "2023-12-20T00:00"]
    yearly = destroyed(spec, RetentionPolicy(keep_last=0, yearly=2), "2024-02-10T00:00")
    assert yearly == ["2022-06-01T00:00", "2023-01-15T00:00", "2024-01-02T00:00"]


def test_reasons_accumulate_and_are_explained() -> None:
    spec = "2024-05-01T01:00 2024-05-01T02:00"
    result = select_for_destroy(
        timeline(spec),
        RetentionPolicy(keep_last=1, daily=1),
        now=at("2024-05-01T03:00"),
        protect={1: "newest common snapshot"},
    )
    reasons = {k.snapshot.guid: k.reasons for k in result.keep}
    assert reasons[1] == ("protected: newest common snapshot",)
    assert reasons[2] == ("newest", "keep_last 1/1", "daily 2024-05-01")
    assert "keep tank/fs@2024-05-01T01:00: protected: newest common snapshot" in result.explain()


def test_protected_snapshots_survive_any_policy() -> None:
    spec = "2020-01-01T00:00 2021-01-01T00:00 2022-01-01T00:00"
    assert destroyed(spec, RetentionPolicy(keep_last=0), "2024-01-01T00:00", frozenset({1})) == [
        "2021-01-01T00:00"
    ]


def test_snapshots_from_the_future_are_kept() -> None:
    spec = "2024-05-01T01:00 2024-05-03T01:00 2024-05-02T01:00"
    snapshots = timeline(spec)
    # createtxg order puts 05-02 last (newest); 05-03 is after `now` (a skewed clock).
    result = select_for_destroy(snapshots, RetentionPolicy(keep_last=0), now=at("2024-05-02T12:00"))
    kept = {k.snapshot.short_name: k.reasons for k in result.keep}
    assert kept["2024-05-03T01:00"] == ("created after now",)
    assert kept["2024-05-02T01:00"] == ("newest",)
    assert [s.short_name for s in result.destroy] == ["2024-05-01T01:00"]


def test_order_is_createtxg_not_input_order() -> None:
    snapshots = timeline("2024-05-01T01:00 2024-05-01T02:00 2024-05-01T03:00")
    result = select_for_destroy(
        list(reversed(snapshots)), RetentionPolicy(keep_last=1), now=at("2024-06-01T00:00")
    )
    assert [s.guid for s in result.destroy] == [1, 2]
    assert result.kept_snapshots == (snapshots[2],)


def test_now_as_epoch_or_any_aware_datetime_is_the_same() -> None:
    spec = " ".join(f"2024-05-{day:02d}T23:30" for day in range(1, 6))
    snapshots = timeline(spec)
    policy = RetentionPolicy(keep_last=0, daily=2)
    moment = at("2024-05-05T23:45")
    by_datetime = select_for_destroy(snapshots, policy, now=moment)
    by_epoch = select_for_destroy(snapshots, policy, now=moment.timestamp())
    elsewhere = moment.astimezone(timezone(timedelta(hours=5)))  # already 05-06 there
    by_other_zone = select_for_destroy(snapshots, policy, now=elsewhere)
    assert by_datetime == by_epoch == by_other_zone
    assert len(by_datetime.destroy) == 3


def test_naive_now_is_refused() -> None:
    with pytest.raises(RetentionInputError) as caught:
        select_for_destroy([], RetentionPolicy(), now=datetime(2024, 5, 1))
    assert isinstance(caught.value, PermanentError)
    assert caught.value.what == "now"


@pytest.mark.parametrize(("field", "value"), [("daily", -1), ("keep_last", True), ("yearly", 1.5)])
def test_policy_rejects_nonsense(field: str, value: object) -> None:
    with pytest.raises(RetentionInputError) as caught:
        RetentionPolicy(**{field: value})  # type: ignore[arg-type]
    assert caught.value.what == field
    assert caught.value.value == value


def test_protections_name_the_base_the_cursor_and_holds() -> None:
    snapshots = timeline("2024-05-01T01:00 2024-05-02T01:00 2024-05-03T01:00 2024-05-04T01:00")
    protect = protections(
        snapshots,
        common_base=snapshots[1],
        cursor=Bookmark("tank/fs#zb_disk1", 1, 10),
        holds=[Hold("tank/fs@2024-05-03T01:00", "zbackupd", 0), Hold("tank/fs@gone", "x", 0)],
    )
    assert protect == {
        2: "newest snapshot shared with the server",
        1: "this disk's cursor zb_disk1",
        3: "held (zbackupd)",
    }
    result = select_for_destroy(
        snapshots, RetentionPolicy(keep_last=0), now=at("2025-01-01T00:00"), protect=protect
    )
    assert result.destroy == ()
    assert result.keep[2].reasons == ("protected: held (zbackupd)",)


# --------------------------------------------------------------------------- properties

EPOCH_2020 = int(at("2020-01-01T00:00").timestamp())
FOUR_YEARS = 4 * 366 * 24 * 3600

policies = st.builds(
    RetentionPolicy,
    keep_last=st.integers(0, 5),
    hourly=st.integers(0, 30),
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 14),
    yearly=st.integers(0, 3),
)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Snapshot], int, frozenset[int]]:
    """Snapshots with creation times mostly rising with createtxg, a `now`, and protections."""
    count = draw(st.integers(0, 40))
    start = draw(st.integers(EPOCH_2020, EPOCH_2020 + FOUR_YEARS))
    gaps = draw(st.lists(st.integers(0, 40 * 24 * 3600), min_size=count, max_size=count))
    snapshots = []
    moment = start
    for position, gap in enumerate(gaps, start=1):
        moment += gap if draw(st.integers(0, 3)) else draw(st.integers(0, 3600))
        snapshots.append(Snapshot(f"tank/fs@s{position}", position, 10 * position, moment))
    now = moment + draw(st.integers(-3600, 90 * 24 * 3600))
    protect = frozenset(draw(st.sets(st.integers(1, max(count, 1)), max_size=3)))
    return snapshots, now, protect


@settings(max_examples=200, deadline=None)
@given(histories(), policies)
def test_retention_properties(
    history: tuple[list[Snapshot], int, frozenset[int]], policy: RetentionPolicy
) -> None:
    snapshots, now, protect = history
    result = select_for_destroy(snapshots, policy, now=now, protect=protect)
    kept = result.kept_snapshots
    # keep and destroy partition the input
    assert sorted(s.guid for s in (*kept, *result.destroy)) == sorted(s.guid for s in snapshots)
    assert not {s.guid for s in kept} & {s.guid for s in result.destroy}
    # every kept snapshot says why
    assert all(k.reasons for k in result.keep)
    # never a protected one, never the newest
    destroyed_guids = {s.guid for s in result.destroy}
    assert not destroyed_guids & protect
    if snapshots:
        assert max(snapshots, key=lambda s: s.createtxg).guid not in destroyed_guids
    # idempotent: applying the decision and deciding again destroys nothing more
    again = select_for_destroy(kept, policy, now=now, protect=protect)
    assert again.destroy == ()
    # a more generous policy never destroys more
    generous = RetentionPolicy(
        keep_last=policy.keep_last + 1,
        hourly=policy.hourly,
        daily=policy.daily + 1,
        weekly=policy.weekly,
        monthly=policy.monthly + 1,
        yearly=policy.yearly,
    )
    more_kept = select_for_destroy(snapshots, generous, now=now, protect=protect)
    assert {s.guid for s in more_kept.destroy} <= destroyed_guids


# --------------------------------------------------------------------------- the clock

DAILY_WEEK = RetentionPolicy(keep_last=1, daily=7)
MONTH_OF_DAYS = " ".join(f"2024-05-{d:02d}T03:00" for d in range(1, 31))


def test_a_clock_years_ahead_keeps_what_the_data_keeps() -> None:
    """Buckets count back from min(now, newest + CLOCK_SLACK): a clock three years ahead
    decides as a clock a day after the newest snapshot does (the unanchored grid would
    have found every daily bucket empty and destroyed all but the newest)."""
    right = destroyed(MONTH_OF_DAYS, DAILY_WEEK, "2024-05-31T03:00")
    ahead = destroyed(MONTH_OF_DAYS, DAILY_WEEK, "2027-05-30T12:00")
    assert ahead == right
    assert right == [f"2024-05-{d:02d}T03:00" for d in range(1, 25)]  # keeps May 25..30


def test_reference_time_is_anchored_on_the_newest_snapshot() -> None:
    snaps = timeline("2024-05-01T10:00 2024-05-02T10:00")
    newest = at("2024-05-02T10:00")
    assert reference_time(at("2024-05-02T12:00"), snaps) == at("2024-05-02T12:00")
    assert reference_time(at("2030-01-01"), snaps) == newest + CLOCK_SLACK
    assert reference_time(at("2024-05-01T00:00"), snaps) == at("2024-05-01T00:00")
    assert reference_time(at("2030-01-01"), []) == at("2030-01-01")


def test_a_clock_past_both_the_disk_and_the_server_data_is_implausible() -> None:
    newest_disk = int(at("2024-05-01T00:00").timestamp())
    newest_server = int(at("2024-05-02T00:00").timestamp())
    fine = check_clock(at("2024-05-03T23:00"), newest_disk=newest_disk,
                       newest_server=newest_server)  # fmt: skip
    assert fine is None
    wrong = check_clock(at("2027-05-02T00:00"), newest_disk=newest_disk,
                        newest_server=newest_server)  # fmt: skip
    assert isinstance(wrong, ClockImplausible)
    text = wrong.explain()
    assert text.startswith("clock looks wrong: now is 2027-05-02T00:00:00Z, newest snapshot "
                           "is 2024-05-02T00:00:00Z")  # fmt: skip
    assert text.endswith("not pruning")
    # Only one side known: that side decides; neither known: nothing to judge by.
    assert check_clock(at("2027-01-01"), newest_disk=newest_disk, newest_server=None)
    assert check_clock(at("2027-01-01"), newest_disk=None, newest_server=None) is None


@settings(max_examples=200, deadline=None)
@given(histories(), policies, st.integers(0, 10 * 366 * 24 * 3600))
def test_a_clock_jump_forward_destroys_nothing_the_data_keeps(
    history: tuple[list[Snapshot], int, frozenset[int]], policy: RetentionPolicy, jump: int
) -> None:
    """For any jump forward of a clock at or after the newest snapshot, nothing kept at
    the data's own time (newest + slack) is destroyed: the decision does not move."""
    snapshots, _, protect = history
    if not snapshots:
        return
    newest = max(s.creation for s in snapshots)
    anchored = newest + int(CLOCK_SLACK.total_seconds())
    at_data = select_for_destroy(snapshots, policy, now=anchored, protect=protect)
    jumped = select_for_destroy(snapshots, policy, now=anchored + jump, protect=protect)
    assert {s.guid for s in jumped.destroy} <= {s.guid for s in at_data.destroy}
    assert jumped == at_data
