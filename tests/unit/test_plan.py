"""The planner, as tables in the notation of planner_notation.py, plus properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_notation import (
    DATASET,
    DiskModel,
    cursor,
    disk,
    render,
    server,
)

from zbackupd.core.conflicts import (
    Diverged,
    EncryptionModeMismatch,
    NoCommonSnapshot,
    NoSourceSnapshot,
    ResumeTokenInfo,
    ResumeTokenMismatch,
    TargetModified,
)
from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot
from zbackupd.core.plan import (
    DatasetPlan,
    IncrementalSend,
    PlanConflictError,
    PlanInvariantError,
    SendPolicy,
    SnapshotFilter,
    newest_common_snapshot,
    plan_dataset,
    select_sendable,
)
from zbackupd.errors import PermanentError, ZbackupdError

ALL = SendPolicy.ALL_INTERMEDIATES
NEWEST = SendPolicy.NEWEST_ONLY
SELECTED = SendPolicy.SELECTED


def plan(
    server_spec: str,
    disk_spec: str | None,
    *,
    policy: SendPolicy = ALL,
    written: int = 0,
    token: str | None = None,
    cursor_spec: str | None = None,
    snapshot_filter: SnapshotFilter | None = None,
    token_info: ResumeTokenInfo | None = None,
) -> DatasetPlan:
    return plan_dataset(
        server=server(server_spec),
        disk=disk(disk_spec, token=token, written=written),
        encryption=Encryption.ENCRYPTED,
        cursor=cursor(cursor_spec) if cursor_spec else None,
        policy=policy,
        snapshot_filter=snapshot_filter or SnapshotFilter(),
        resume_token_info=token_info,
    )


# (server, disk, policy, expected)
TABLE = [
    # full sends: no dataset on the disk, or one without snapshots
    ("a:1 b:2 c:3", None, ALL, "full a; -I a c"),
    ("a:1 b:2 c:3", None, NEWEST, "full c"),
    ("a:1 b:2 c:3", None, SELECTED, "full a; -i a b; -i b c"),
    ("a:1", None, ALL, "full a"),
    ("a:1 b:2 c:3", "", ALL, "full a (exists); -I a c"),
    ("", None, ALL, "NoSourceSnapshot"),
    # incrementals from the newest common snapshot
    ("a:1 b:2 c:3", "a:1 b:2", ALL, "-I b c"),
    ("a:1 b:2 c:3 d:4", "a:1 b:2", NEWEST, "-i b d"),
    ("a:1 b:2 c:3 d:4", "a:1 b:2", SELECTED, "-i b c; -i c d"),
    ("a:1 b:2 c:3 d:4", "a:1", ALL, "-I a d"),
    # the server pruned what the disk still holds: old disk snapshots do not matter
    ("c:3 d:4", "a:1 b:2 c:3", ALL, "-I c d"),
    # up to date
    ("a:1 b:2 c:3", "a:1 b:2 c:3", ALL, "uptodate c"),
    ("a:1 b:2 c:3", "c:3", NEWEST, "uptodate c"),
    # renamed snapshots match by guid; the send uses the server's names
    ("x:1 y:2 z:3", "a:1 b:2", ALL, "-I y z"),
    ("x:1 y:2", "a:1 b:2", ALL, "uptodate y"),
    # the same name with another guid is not the same snapshot
    ("a:1 b:2", "a:9", ALL, "NoCommonSnapshot"),
    ("a:1 b:2", "a:1 b:9", ALL, "Diverged"),
    ("", "a:1", ALL, "NoCommonSnapshot"),
    # bookmark fallback: the disk's newest snapshot is gone on the server, a bookmark stays
    ("#b:2 c:3 d:4", "a:1 b:2", ALL, "-i #b c; -I c d"),
    ("#b:2 c:3 d:4", "a:1 b:2", NEWEST, "-i #b d"),
    ("#b:2 c:3 d:4", "a:1 b:2", SELECTED, "-i #b c; -i c d"),
    ("a:1 #b:2 c:3", "a:1 b:2", ALL, "-i #b c"),
    ("a:1 #b:2", "a:1 b:2", ALL, "uptodate b"),
    # a snapshot is preferred over a bookmark with the same guid (so -I is possible)
    ("b:2 #b:2@110 c:3 d:4", "b:2", ALL, "-I b d"),
    # divergence: the disk has snapshots newer than the common one the server lacks
    ("a:1 b:2 c:3", "a:1 b:2 x:7", ALL, "Diverged"),
    ("a:1 c:3", "a:1 b:2", ALL, "Diverged"),
    ("a:1 b:2", "a:1 b:2 x:7", ALL, "Diverged"),
]


@pytest.mark.parametrize(("server_spec", "disk_spec", "policy", "expected"), TABLE)
def test_plan_table(
    server_spec: str, disk_spec: str | None, policy: SendPolicy, expected: str
) -> None:
    assert render(plan(server_spec, disk_spec, policy=policy)) == expected


def test_plan_does_not_depend_on_listing_order() -> None:
    shuffler = random.Random(7)  # noqa: S311 -- a reproducible shuffle, not a secret
    srv = server("a:1 b:2 #c:3 d:4 e:5 f:6")
    dsk = disk("a:1 b:2 c:3")
    assert dsk is not None
    expected = render(plan_dataset(server=srv, disk=dsk, encryption=Encryption.PLAIN))
    assert expected == "-i #c d; -I d f"
    for _ in range(10):
        shuffled_server = DatasetState(
            srv.name,
            tuple(shuffler.sample(srv.snapshots, len(srv.snapshots))),
            tuple(shuffler.sample(srv.bookmarks, len(srv.bookmarks))),
        )
        shuffled_disk = DatasetState(
            dsk.name, tuple(shuffler.sample(dsk.snapshots, len(dsk.snapshots)))
        )
        got = plan_dataset(server=shuffled_server, disk=shuffled_disk, encryption=Encryption.PLAIN)
        assert render(got) == expected


def test_order_comes_from_createtxg_not_listing_position() -> None:
    # Listed b before a, but a is newer on the server (txg 300 > 200).
    result = plan("b:2@200 a:1@300", None, policy=NEWEST)
    assert render(result) == "full a"


def test_target_modified_blocks_a_receive() -> None:
    result = plan("a:1 b:2 c:3", "a:1 b:2", written=4096)
    assert isinstance(result.conflict, TargetModified)
    assert result.conflict.written_bytes == 4096
    assert result.conflict.last_snapshot.short_name == "b"
    assert "4096 bytes written" in result.explain()
    assert result.steps == ()


def test_target_modified_without_anything_to_send_is_still_up_to_date() -> None:
    assert render(plan("a:1 b:2", "a:1 b:2", written=4096)) == "uptodate b"


def test_resume_comes_first_and_asks_for_a_new_plan() -> None:
    result = plan("a:1 b:2 c:3", "a:1", token="1-abc-def")
    assert render(result) == "resume"
    assert result.replan_after
    assert result.transfers[0].describe().startswith("resume the interrupted receive")


def test_resume_of_a_first_full_receive() -> None:
    result = plan("a:1", "", token="1-abc")
    assert render(result) == "resume"


def test_resume_token_checked_against_the_server_when_known() -> None:
    fits = plan("a:1 b:2", "a:1", token="t", token_info=ResumeTokenInfo(2, 1, "tank/fs@b"))
    assert render(fits) == "resume"
    from_bookmark = plan("#a:1 b:2", "a:1", token="t", token_info=ResumeTokenInfo(2, 1))
    assert render(from_bookmark) == "resume"

    target_gone = plan("a:1 c:3", "a:1", token="t", token_info=ResumeTokenInfo(2, 1, "tank/fs@b"))
    assert isinstance(target_gone.conflict, ResumeTokenMismatch)
    assert target_gone.conflict.missing_role == "target"
    assert target_gone.conflict.missing_guid == 2
    assert "zfs receive -A" in target_gone.explain()

    source_gone = plan("b:2 c:3", "a:1", token="t", token_info=ResumeTokenInfo(2, 1))
    assert isinstance(source_gone.conflict, ResumeTokenMismatch)
    assert source_gone.conflict.missing_role == "source"


def test_no_common_snapshot_lists_the_newest_of_each_side() -> None:
    result = plan("a:1 b:2 #c:3", "x:8 y:9", cursor_spec="#zb_disk1:7")
    conflict = result.conflict
    assert isinstance(conflict, NoCommonSnapshot)
    assert conflict.server_newest is not None
    assert conflict.server_newest.short_name == "b"
    assert conflict.server_newest_bookmark is not None
    assert conflict.server_newest_bookmark.short_name == "c"  # txg 130; the cursor is 110
    assert conflict.disk_newest.short_name == "y"
    text = result.explain()
    for fact in ("tank/fs@b", "tank/fs@y", "guid 9", "zb_disk1", "guid 7"):
        assert fact in text


def test_diverged_carries_both_sides_newer_snapshots() -> None:
    result = plan("a:1 b:2 c:3 d:4", "a:1 b:2 x:7 y:8")
    conflict = result.conflict
    assert isinstance(conflict, Diverged)
    assert conflict.common_base.short_name == "b"
    assert [s.short_name for s in conflict.disk_only] == ["x", "y"]
    assert [s.short_name for s in conflict.server_only] == ["c", "d"]
    assert result.common_base == conflict.common_base
    assert "x, y" in result.explain()


@pytest.mark.parametrize(
    "server_spec",
    ["#other_disk:2@110 #zb_disk1:2@110 c:3", "#zb_disk1:2@110 #other_disk:2@110 c:3"],
)
def test_cursor_bookmark_is_preferred_among_bookmarks_of_the_same_snapshot(
    server_spec: str,
) -> None:
    # Bookmarks of one snapshot share its guid and createtxg; listing order must not matter.
    result = plan(server_spec, "a:1 b:2", cursor_spec="#zb_disk1:2@110")
    assert render(result) == "-i #zb_disk1 c"
    without_cursor = plan(server_spec, "a:1 b:2")
    assert render(without_cursor) in {"-i #other_disk c", "-i #zb_disk1 c"}


def test_cursor_missing_from_the_listing_still_counts_as_a_server_bookmark() -> None:
    # The caller passes the cursor it read separately; it is a valid incremental source.
    result = plan("c:3@200", "a:1 b:2", cursor_spec="#zb_disk1:2")
    assert render(result) == "-i #zb_disk1 c"


def test_a_stale_cursor_is_noted() -> None:
    result = plan("a:1 b:2 c:3", "a:1 b:2", cursor_spec="#zb_disk1:1")
    assert render(result) == "-I b c"
    assert any("zb_disk1" in note for note in result.notes)


def test_plan_exposes_base_and_final_snapshot() -> None:
    result = plan("x:1 y:2 z:3", "a:1 b:2")
    assert result.common_base is not None
    assert (result.common_base.short_name, result.common_base.guid) == ("b", 2)  # disk's name
    assert result.final_snapshot is not None
    assert result.final_snapshot.short_name == "z"


OWN = SnapshotFilter(own_prefix="zb_")


@pytest.mark.parametrize(
    ("server_spec", "disk_spec", "policy", "expected"),
    [
        ("zb_1:1 h_2:2 zb_3:3 h_4:4", None, ALL, "full zb_1; -I zb_1 zb_3"),
        ("zb_1:1 h_2:2 zb_3:3 h_4:4", None, SELECTED, "full zb_1; -i zb_1 zb_3"),
        ("zb_1:1 h_2:2 zb_3:3 h_4:4", None, NEWEST, "full zb_3"),
        ("zb_1:1 h_2:2 zb_3:3 h_4:4", "zb_1:1 h_2:2", ALL, "-I h_2 zb_3"),
        ("zb_1:1 h_2:2 zb_3:3 h_4:4", "zb_1:1 h_2:2 zb_3:3 h_4:4", ALL, "uptodate h_4"),
        ("zb_1:1 h_2:2 zb_3:3 h_4:4", "zb_1:1 h_2:2 zb_3:3", SELECTED, "uptodate zb_3"),
        ("h_1:1 h_2:2", None, ALL, "NoSourceSnapshot"),
        ("h_1:1 h_2:2", "h_1:1", ALL, "uptodate h_1"),
    ],
)
def test_snapshot_filter_chooses_targets_only(
    server_spec: str, disk_spec: str | None, policy: SendPolicy, expected: str
) -> None:
    assert render(plan(server_spec, disk_spec, policy=policy, snapshot_filter=OWN)) == expected


def test_snapshot_filter_reuse_patterns() -> None:
    reuse = SnapshotFilter(own_prefix="zb_", reuse_patterns=("autosnap_*_daily",))
    snaps = server(
        "autosnap_2024-01-01_daily:1 autosnap_2024-01-01_hourly:2 zb_x:3 other:4"
    ).snapshots
    assert [s.short_name for s in select_sendable(snaps, reuse)] == [
        "autosnap_2024-01-01_daily",
        "zb_x",
    ]
    assert len(select_sendable(snaps)) == 4
    only_pattern = SnapshotFilter(reuse_patterns=("other",))
    assert [s.short_name for s in select_sendable(snaps, only_pattern)] == ["other"]


def test_no_source_snapshot_is_transient_and_explained() -> None:
    result = plan("h_1:1", None, snapshot_filter=OWN)
    assert isinstance(result.conflict, NoSourceSnapshot)
    with pytest.raises(PlanConflictError) as caught:
        result.raise_for_conflict()
    assert caught.value.transient
    assert caught.value.conflict is result.conflict
    assert "tank/fs" in str(caught.value)


def test_conflict_error_is_a_permanent_zbackupd_error_for_real_conflicts() -> None:
    result = plan("a:1", "b:2")
    with pytest.raises(ZbackupdError) as caught:
        result.raise_for_conflict()
    assert not caught.value.transient
    plan("a:1 b:2", "a:1").raise_for_conflict()  # no conflict: does not raise


def test_incremental_send_refuses_impossible_streams() -> None:
    mark = Bookmark(f"{DATASET}#m", 1, 10)
    snap = Snapshot(f"{DATASET}@s", 2, 20)
    with pytest.raises(PlanInvariantError) as caught:
        IncrementalSend(mark, snap, intermediates=True)
    assert isinstance(caught.value, PermanentError)
    with pytest.raises(PlanInvariantError):
        IncrementalSend(snap, snap, intermediates=False)


def test_explain_lists_the_steps_and_the_mode() -> None:
    text = plan("a:1 b:2 c:3", None, policy=SELECTED).explain()
    assert "raw" in text
    assert "full send of tank/fs@a" in text
    assert "incremental send -i tank/fs@b tank/fs@c" in text
    assert "up to date at tank/fs@c" in plan("a:1 b:2 c:3", "c:3").explain()
    assert "then list the disk again" in plan("a:1", "", token="t").explain()


def test_newest_common_snapshot_uses_guids_and_disk_order() -> None:
    srv = server("p:1 q:2 #r:3")
    dsk = disk("a:1 b:2 c:3 d:4")
    assert dsk is not None
    common = newest_common_snapshot(srv.snapshots, srv.bookmarks, dsk.snapshots)
    assert common is not None
    assert common.short_name == "c"
    assert newest_common_snapshot(srv.snapshots, (), dsk.snapshots) == dsk.snapshots[1]
    assert newest_common_snapshot((), (), dsk.snapshots) is None


def test_mixing_raw_and_non_raw_into_one_dataset_is_a_conflict() -> None:
    srv = server("a:1 b:2")
    dsk = disk("a:1")
    mixed = plan_dataset(
        server=srv, disk=dsk, encryption=Encryption.ENCRYPTED, disk_encryption=Encryption.PLAIN
    )
    assert isinstance(mixed.conflict, EncryptionModeMismatch)
    assert (mixed.conflict.source, mixed.conflict.disk) == (Encryption.ENCRYPTED, Encryption.PLAIN)
    assert "cannot be mixed" in mixed.explain()
    same = plan_dataset(
        server=srv, disk=dsk, encryption=Encryption.PLAIN, disk_encryption=Encryption.PLAIN
    )
    assert render(same) == "-I a b"
    assert "compressed, non-raw" in same.explain()
    # with no dataset on the disk there is nothing to mix with
    fresh = plan_dataset(
        server=srv, disk=None, encryption=Encryption.ENCRYPTED, disk_encryption=Encryption.PLAIN
    )
    assert render(fresh) == "full a; -I a b"


# --------------------------------------------------------------------------- properties

MAX_HISTORY = 8
FOREIGN_GUID0 = 50_000


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[DatasetState, DiskModel, SendPolicy, SnapshotFilter, Bookmark | None]:
    """A physically plausible pair of sides.

    The server has a linear history of snapshots, some destroyed (some of those kept as
    bookmarks); the disk received some prefix of that history (maybe pruned, maybe
    renamed, maybe a partial receive of the next one), and may carry snapshots of its own
    (diverged), be modified, or hold an unrelated history.
    """

    def usually() -> bool:
        return draw(st.integers(0, 3)) > 0

    def rarely() -> bool:
        return draw(st.integers(0, 7)) == 0

    length = draw(st.integers(0, MAX_HISTORY))
    history = [
        Snapshot(f"{DATASET}@{'zb_' if usually() else 'h_'}{i}", 1000 + i, 100 + 10 * i)
        for i in range(length)
    ]
    kept = [usually() for _ in history]
    marked = [draw(st.booleans()) for _ in history]
    received = draw(st.integers(0, length))  # how much of the history reached the disk
    if received and draw(st.booleans()):
        # the common case that needs a bookmark: the server pruned what the disk has last
        kept[received - 1], marked[received - 1] = False, True
    server_state = DatasetState(
        DATASET,
        tuple(snap for snap, keep in zip(history, kept, strict=True) if keep),
        tuple(
            Bookmark(f"{DATASET}#m{snap.guid}", snap.guid, snap.createtxg)
            for snap, keep, mark in zip(history, kept, marked, strict=True)
            if mark and not keep
        ),
    )

    model = DiskModel(exists=usually())
    if model.exists:
        rename = draw(st.booleans())
        for index, snap in enumerate(history[:received]):
            if index != received - 1 and draw(st.booleans()):
                continue  # pruned on the disk; retention never destroys the newest
            name = f"{DATASET}@renamed{index}" if rename else snap.name
            model._receive(Snapshot(name, snap.guid, 0))
        if rarely():  # snapshots taken on the disk itself
            for extra in range(draw(st.integers(1, 2))):
                model._receive(Snapshot(f"{DATASET}@local{extra}", FOREIGN_GUID0 + extra, 0))
        if rarely():  # an unrelated history (another pool's dataset)
            model.snapshots = [
                Snapshot(s.name, s.guid + 7 * FOREIGN_GUID0, s.createtxg) for s in model.snapshots
            ]
        if rarely():
            model.written = 8192
        if received < length and rarely():
            model.token = "1-partial"
            model.resume_target = history[received]
            model.resume_from_guid = model.snapshots[-1].guid if model.snapshots else None
    policy = draw(st.sampled_from(list(SendPolicy)))
    snapshot_filter = draw(st.sampled_from([SnapshotFilter(), OWN]))
    disk_cursor: Bookmark | None = None
    with_cursor = draw(st.booleans())
    if server_state.bookmarks and with_cursor:
        disk_cursor = draw(st.sampled_from(list(server_state.bookmarks)))
    return server_state, model, policy, snapshot_filter, disk_cursor


def run_until_settled(
    server_state: DatasetState,
    model: DiskModel,
    policy: SendPolicy,
    snapshot_filter: SnapshotFilter,
    disk_cursor: Bookmark | None,
) -> DatasetPlan:
    """Plan, apply, re-plan until the planner says up to date or reports a conflict.

    The token's contents are passed as the shell would (decoded from the disk's token).
    Every step is applied with zfs receive's preconditions (DiskModel raises otherwise),
    and no disk snapshot may ever disappear.
    """
    for _ in range(4):
        before = set(model.guids())
        result = plan_dataset(
            server=server_state,
            disk=model.state(),
            encryption=Encryption.ENCRYPTED,
            cursor=disk_cursor,
            policy=policy,
            snapshot_filter=snapshot_filter,
            resume_token_info=model.token_info(),
        )
        if result.is_conflict or result.is_up_to_date:
            return result
        for step in result.steps:
            model.apply(step, server_state)
        assert before <= set(model.guids())
        if not result.replan_after:
            settled = plan_dataset(
                server=server_state,
                disk=model.state(),
                encryption=Encryption.ENCRYPTED,
                cursor=disk_cursor,
                policy=policy,
                snapshot_filter=snapshot_filter,
            )
            assert settled.is_up_to_date, settled.explain()
            assert settled.final_snapshot is not None
            assert result.final_snapshot is not None
            assert settled.final_snapshot.guid == result.final_snapshot.guid
            return settled
    raise AssertionError("the plan did not settle")


def server_txg_of(server_state: DatasetState, guid: int) -> int:
    versions: list[Snapshot | Bookmark] = [*server_state.snapshots, *server_state.bookmarks]
    return next(v.createtxg for v in versions if v.guid == guid)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_applying_a_plan_brings_the_disk_to_the_servers_newest(
    scenario: tuple[DatasetState, DiskModel, SendPolicy, SnapshotFilter, Bookmark | None],
) -> None:
    server_state, model, policy, snapshot_filter, disk_cursor = scenario
    final = run_until_settled(server_state, model, policy, snapshot_filter, disk_cursor)
    if final.is_conflict:
        return
    sendable = select_sendable(server_state.snapshots, snapshot_filter)
    assert model.snapshots, "a settled plan without conflict leaves snapshots on the disk"
    disk_newest = model.snapshots[-1].guid
    # The disk's newest is known to the server and not older than the newest sendable one.
    newest_on_server = server_txg_of(server_state, disk_newest)
    if sendable:
        assert newest_on_server >= sendable[-1].createtxg
    # Without a filter, and when the server's newest version is a snapshot, they are equal.
    versions: list[Snapshot | Bookmark] = [*server_state.snapshots, *server_state.bookmarks]
    versions.sort(key=lambda version: version.createtxg)
    if snapshot_filter == SnapshotFilter() and isinstance(versions[-1], Snapshot):
        assert disk_newest == versions[-1].guid


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_conflicts_are_reported_only_when_real(
    scenario: tuple[DatasetState, DiskModel, SendPolicy, SnapshotFilter, Bookmark | None],
) -> None:
    server_state, model, policy, snapshot_filter, disk_cursor = scenario
    state = model.state()
    result = plan_dataset(
        server=server_state,
        disk=state,
        encryption=Encryption.PLAIN,
        cursor=disk_cursor,
        policy=policy,
        snapshot_filter=snapshot_filter,
    )
    server_guids = {s.guid for s in server_state.snapshots} | {
        b.guid for b in server_state.bookmarks
    }
    disk_guids = set(model.guids())
    match result.conflict:
        case NoCommonSnapshot():
            assert disk_guids
            assert not disk_guids & server_guids
        case Diverged(disk_only=disk_only, common_base=base):
            assert disk_only
            assert not {s.guid for s in disk_only} & server_guids
            assert base.guid in server_guids
        case TargetModified():
            assert model.written > 0
        case NoSourceSnapshot():
            assert not disk_guids
            assert not select_sendable(server_state.snapshots, snapshot_filter)
        case None:
            if model.token is None and result.transfers:
                assert model.written == 0 or not disk_guids
        case ResumeTokenMismatch() | EncryptionModeMismatch():
            raise AssertionError("neither token info nor the disk's mode was given")
    if model.token is not None:
        assert render(result) == "resume"
    # The planner never asks to roll back: the base of the first incremental is the
    # disk's newest snapshot, so nothing at or before it can be destroyed by a receive.
    first = result.transfers[0] if result.transfers else None
    if isinstance(first, IncrementalSend):
        assert model.snapshots[-1].guid == first.from_.guid
