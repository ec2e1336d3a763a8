"""Pure retention: which of a disk dataset's snapshots to destroy, and why the rest stay.

A grid like sanoid's and zrepl's: keep the newest ``keep_last`` snapshots, and for each
bucket kind (hourly, daily, weekly, monthly, yearly) the newest snapshot in each of the
last K calendar periods (UTC), counting the period of the *reference time* as the first.
``now`` is passed in, so the decision is reproducible. Whatever the policy says, the newest
snapshot and every protected one (the newest snapshot shared with the server, the one
this disk's cursor records, anything held) are kept.

The client's wall clock is not trusted on its own: a clock years ahead would make every
bucket empty and destroy the history. The reference time is ``min(now, newest snapshot's
creation + CLOCK_SLACK)``: the grid is anchored on the data, so a clock jumping forward
past the data changes no decision (a run's newest snapshot was taken by the server moments
ago, so a right clock is never more than the slack ahead of it on a fresh run). And when
``now`` is more than ``CLOCK_IMPLAUSIBLE`` after both the disk's newest snapshot and the
newest server snapshot the run saw, ``check_clock`` says the clock looks wrong: the caller
then prunes nothing and warns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

from zbackupd.core.model import Bookmark, Hold, Snapshot
from zbackupd.errors import PermanentError

#: How far past the newest snapshot the buckets may be anchored: one day lets a right clock
#: decide normally between the run snapshot and the end of its day, and no more.
CLOCK_SLACK = timedelta(days=1)
#: How far ahead of the newest snapshot on both sides a clock may be before it is not
#: believed (a run snapshots the server first, so a right clock is minutes ahead of it).
CLOCK_IMPLAUSIBLE = timedelta(days=2)


class RetentionInputError(PermanentError):
    """A retention policy or input that cannot be decided on (a bug or a bad config)."""

    def __init__(self, what: str, value: object, why: str) -> None:
        self.what = what
        self.value = value
        super().__init__(f"retention {what}={value!r}: {why}")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How many snapshots to keep, per rule; 0 turns a rule off.

    The config's pydantic model has the same fields and builds one of these.
    """

    keep_last: int = 1
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RetentionInputError(spec.name, value, "must be a whole number >= 0")


@dataclass(frozen=True, slots=True)
class KeptSnapshot:
    """A snapshot retention keeps, with every reason it is kept."""

    snapshot: Snapshot
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """``keep`` and ``destroy`` partition the input; both are ordered oldest first."""

    keep: tuple[KeptSnapshot, ...]
    destroy: tuple[Snapshot, ...]

    @property
    def kept_snapshots(self) -> tuple[Snapshot, ...]:
        return tuple(kept.snapshot for kept in self.keep)

    def explain(self) -> str:
        return explain_partition(self.keep, self.destroy)


def explain_partition(keep: Iterable[KeptSnapshot], destroy: Iterable[Snapshot]) -> str:
    """One line per snapshot: ``keep <name>: <reasons>``, then ``destroy <name>``."""
    lines = [f"keep {kept.snapshot.name}: {', '.join(kept.reasons)}" for kept in keep]
    lines += [f"destroy {snap.name}" for snap in destroy]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Bucket:
    kind: str
    period: Callable[[datetime], int]  # consecutive periods have consecutive numbers
    label: Callable[[datetime], str]


def _hour(moment: datetime) -> int:
    return moment.toordinal() * 24 + moment.hour


def _week(moment: datetime) -> int:
    return (moment.toordinal() - moment.weekday()) // 7  # weeks start on Monday (ISO)


def _month(moment: datetime) -> int:
    return moment.year * 12 + moment.month - 1


_BUCKETS = (
    _Bucket("hourly", _hour, lambda m: m.strftime("%Y-%m-%dT%H")),
    _Bucket("daily", lambda m: m.toordinal(), lambda m: m.strftime("%Y-%m-%d")),
    _Bucket("weekly", _week, lambda m: m.strftime("%G-W%V")),
    _Bucket("monthly", _month, lambda m: m.strftime("%Y-%m")),
    _Bucket("yearly", lambda m: m.year, lambda m: m.strftime("%Y")),
)


def _as_utc(now: datetime | float) -> datetime:
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise RetentionInputError("now", now, "needs a time zone (pass UTC)")
        return now.astimezone(UTC)
    return datetime.fromtimestamp(now, UTC)


def _protect_reasons(protect: Mapping[int, str] | Collection[int]) -> dict[int, str]:
    if isinstance(protect, Mapping):
        return {guid: f"protected: {reason}" for guid, reason in protect.items()}
    return dict.fromkeys(protect, "protected")


def protections(
    snapshots: Iterable[Snapshot],
    *,
    common_base: Snapshot | None = None,
    cursor: Bookmark | None = None,
    holds: Iterable[Hold] = (),
) -> dict[int, str]:
    """The ``protect`` argument for one dataset: guid -> why it must stay.

    ``common_base`` is the newest snapshot shared with the server (plan.common_base or
    the run's final snapshot), ``cursor`` this disk's bookmark on the server, ``holds``
    the disk's user holds (matched by snapshot name, the only key ``zfs holds`` gives).
    """
    protect: dict[int, str] = {}
    if common_base is not None:
        protect[common_base.guid] = "newest snapshot shared with the server"
    if cursor is not None:
        protect.setdefault(cursor.guid, f"this disk's cursor {cursor.short_name}")
    by_name = {snap.name: snap for snap in snapshots}
    for hold in holds:
        held = by_name.get(hold.snapshot)
        if held is not None:
            protect.setdefault(held.guid, f"held ({hold.tag})")
    return protect


def reference_time(now: datetime | float, snapshots: Iterable[Snapshot]) -> datetime:
    """The time the buckets count back from: ``min(now, newest creation + CLOCK_SLACK)``
    (``now`` alone when there are no snapshots)."""
    now_utc = _as_utc(now)
    newest = max((snap.creation for snap in snapshots), default=None)
    if newest is None:
        return now_utc
    return min(now_utc, datetime.fromtimestamp(newest, UTC) + CLOCK_SLACK)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ClockImplausible:
    """``now`` is more than ``CLOCK_IMPLAUSIBLE`` after every snapshot the run saw."""

    now: datetime
    newest: datetime  # the newest snapshot creation known, disk or server

    def explain(self) -> str:
        return (
            f"clock looks wrong: now is {_stamp(self.now)}, newest snapshot is "
            f"{_stamp(self.newest)} (more than {CLOCK_IMPLAUSIBLE.days} days apart); "
            "not pruning"
        )


def check_clock(
    now: datetime | float, *, newest_disk: int | None, newest_server: int | None
) -> ClockImplausible | None:
    """Whether ``now`` can be believed for pruning: not when it is more than
    ``CLOCK_IMPLAUSIBLE`` after the disk's newest snapshot AND after the newest server
    snapshot the run saw (creation times, seconds since the epoch; ``None``: none
    known). With neither known there is nothing to judge by: believed."""
    known = [stamp for stamp in (newest_disk, newest_server) if stamp is not None]
    if not known:
        return None
    now_utc = _as_utc(now)
    newest = datetime.fromtimestamp(max(known), UTC)
    if now_utc - newest > CLOCK_IMPLAUSIBLE:
        return ClockImplausible(now_utc, newest)
    return None


def select_for_destroy(
    snapshots: Iterable[Snapshot],
    policy: RetentionPolicy,
    *,
    now: datetime | float,
    protect: Mapping[int, str] | Collection[int] = (),
) -> RetentionResult:
    """Decide which snapshots of one dataset to destroy.

    ``protect`` holds guids (optionally mapped to a reason, e.g. "newest common snapshot").
    Snapshots are ordered by ``createtxg``; buckets use ``creation`` (UTC) and count back
    from ``reference_time`` (``now``, but never more than ``CLOCK_SLACK`` after the
    newest snapshot). A snapshot created after ``now`` (clock skew) is kept: nothing is
    destroyed on a guess.
    """
    ordered = sorted(snapshots, key=lambda snap: (snap.createtxg, snap.guid))
    now_utc = reference_time(now, ordered)
    reasons: list[list[str]] = [[] for _ in ordered]
    protected = _protect_reasons(protect)

    for index, snap in enumerate(ordered):
        if snap.guid in protected:
            reasons[index].append(protected[snap.guid])
        if snap.creation > now_utc.timestamp():
            reasons[index].append("created after now")
    if ordered:
        reasons[-1].append("newest")
    for rank, index in enumerate(range(len(ordered) - 1, -1, -1)):
        if rank >= policy.keep_last:
            break
        reasons[index].append(f"keep_last {rank + 1}/{policy.keep_last}")

    created = [datetime.fromtimestamp(snap.creation, UTC) for snap in ordered]
    for bucket in _BUCKETS:
        count: int = getattr(policy, bucket.kind)
        if count == 0:
            continue
        newest_period = bucket.period(now_utc)
        oldest_period = newest_period - count + 1
        newest_in_period: dict[int, int] = {}
        for index, moment in enumerate(created):  # oldest first: the last one seen wins
            period = bucket.period(moment)
            if oldest_period <= period <= newest_period:
                newest_in_period[period] = index
        for index in newest_in_period.values():
            reasons[index].append(f"{bucket.kind} {bucket.label(created[index])}")

    keep = tuple(
        KeptSnapshot(snap, tuple(why)) for snap, why in zip(ordered, reasons, strict=True) if why
    )
    destroy = tuple(snap for snap, why in zip(ordered, reasons, strict=True) if not why)
    return RetentionResult(keep=keep, destroy=destroy)
