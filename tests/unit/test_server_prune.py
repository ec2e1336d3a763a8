"""Pruning zbackupd's own snapshots on the server: the decision (tables and properties),
the registry of snapshots running sessions rely on, and the commands sent to the server.

Notation: ``listing("zbackupd_20260101T000000Z sanoid zbackupd_20260102T000000Z")``
builds snapshots of ``tank/fs`` oldest first, guid = position, createtxg = 10 * position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbackupd.config import load_config
from zbackupd.core.model import Bookmark, Snapshot
from zbackupd.errors import PermanentError
from zbackupd.server.cleanup import clean_up_dataset
from zbackupd.server.prune import (
    InUseRegistry,
    InUseView,
    OwnSnapshotPolicy,
    ServerPruneDecision,
    ServerPruneFailed,
    ServerPruneInputError,
    other_disk_labels,
    select_own_for_destroy,
)
from zbackupd.zfs import names, parse
from zbackupd.zfs.runner import CommandResult

DATASET = "tank/fs"
REPO = Path(__file__).resolve().parents[2]
ZFS_OUTPUT = REPO / "tests" / "data" / "zfs-output"


def own(day: int) -> str:
    return f"zbackupd_202601{day:02d}T000000Z"


def listing(spec: str, dataset: str = DATASET) -> list[Snapshot]:
    return [
        Snapshot(f"{dataset}@{short}", position, 10 * position)
        for position, short in enumerate(spec.split(), start=1)
    ]


def by_short(snapshots: Sequence[Snapshot], short: str) -> Snapshot:
    return next(snap for snap in snapshots if snap.short_name == short)


def cursor(snapshots: Sequence[Snapshot], short: str, label: str = "other") -> Bookmark:
    snap = by_short(snapshots, short)
    return Bookmark(f"{snap.dataset}#zbackupd_{label}", snap.guid, snap.createtxg)


def destroyed(
    spec: str,
    sent: str | None,
    *,
    keep: int = 1,
    prefix: str = "zbackupd",
    held: tuple[str, ...] = (),
    in_use: tuple[str, ...] = (),
    cursors: tuple[str, ...] = (),
) -> list[str]:
    snaps = listing(spec)
    decision = select_own_for_destroy(
        DATASET,
        snaps,
        OwnSnapshotPolicy(prefix, keep),
        sent=by_short(snaps, sent) if sent else None,
        held={f"{DATASET}@{short}" for short in held},
        in_use={f"{DATASET}@{short}" for short in in_use},
        other_cursors=[cursor(snaps, short, f"d{n}") for n, short in enumerate(cursors)],
    )
    return list(decision.short_names)


# -- the decision, by table ---------------------------------------------------------------

D1, D2, D3, D4, D5 = (own(day) for day in range(1, 6))
HISTORY = f"{D1} {D2} {D3} {D4}"


@pytest.mark.parametrize(
    ("case", "spec", "sent", "options", "expected"),
    [
        ("older own ones go, the sent one stays", HISTORY, D4, {}, [D1, D2, D3]),
        ("keep 2", HISTORY, D4, {"keep": 2}, [D1, D2]),
        ("keep more than there are", HISTORY, D4, {"keep": 9}, []),
        ("first run: nothing older", D1, D1, {}, []),
        ("held survives", HISTORY, D4, {"held": (D2,)}, [D1, D3]),
        ("in use by another session survives", HISTORY, D4, {"in_use": (D1,)}, [D2, D3]),
        ("nothing newer than the sent one", HISTORY, D2, {}, [D1]),
        # newest-keep counts every own snapshot, also those newer than the sent one
        ("sent is not the newest, keep 2", HISTORY, D2, {"keep": 2}, [D1]),
        ("sent unknown: nothing", HISTORY, None, {}, []),
        (
            "sanoid and user snapshots are never touched",
            f"autosnap_2026-01-01_daily {D1} manual zbackupd_manual {D2} zbackupd_2026 "
            "zbackupdx_20260101T000000Z",
            D2,
            {},
            [D1],
        ),
        ("another prefix is another's", f"{D1} {D2} {D3}", D3, {"prefix": "other"}, []),
        ("another disk's cursor keeps itself and newer", HISTORY, D4, {"cursors": (D2,)}, [D1]),
        ("the oldest of several cursors counts", HISTORY, D4, {"cursors": (D3, D2)}, [D1]),
        ("a cursor at the sent one", HISTORY, D4, {"cursors": (D4,)}, [D1, D2, D3]),
    ],
)
def test_which_own_snapshots_go(
    case: str, spec: str, sent: str | None, options: dict[str, Any], expected: list[str]
) -> None:
    assert destroyed(spec, sent, **options) == expected, case


def test_a_sent_snapshot_missing_from_the_listing_destroys_nothing() -> None:
    snaps = listing(HISTORY)
    elsewhere = Snapshot(f"xpool/backup/{DATASET}@{D4}", 999, 5)  # the disk's copy
    decision = select_own_for_destroy(DATASET, snaps, OwnSnapshotPolicy(), sent=elsewhere)
    assert decision.destroy == ()
    assert all("not in the listing" in kept.reasons[0] for kept in decision.keep)


def test_the_decision_explains_every_own_snapshot() -> None:
    snaps = listing(f"manual {D1} {D2} {D3}")
    decision = select_own_for_destroy(
        DATASET, snaps, OwnSnapshotPolicy(), sent=by_short(snaps, D2), held={f"{DATASET}@{D1}"}
    )
    assert decision.explain().splitlines() == [
        f"keep {DATASET}@{D1}: held",
        f"keep {DATASET}@{D2}: sent by this run",
        f"keep {DATASET}@{D3}: newer than this run's snapshot, newest 1/1",
    ]


def test_snapshots_of_another_dataset_are_refused() -> None:
    snaps = [*listing(HISTORY), *listing(D5, dataset="tank/other")]
    with pytest.raises(ServerPruneInputError) as caught:
        select_own_for_destroy(DATASET, snaps, OwnSnapshotPolicy(), sent=snaps[0])
    assert "tank/other" in str(caught.value)


@pytest.mark.parametrize(("keep", "prefix"), [(0, "zbackupd"), (True, "zbackupd"), (1, "-x")])
def test_a_bad_policy_is_refused(keep: int, prefix: str) -> None:
    with pytest.raises(ServerPruneInputError) as caught:
        OwnSnapshotPolicy(prefix, keep)
    assert isinstance(caught.value, PermanentError)


# -- the decision, by property ------------------------------------------------------------

OWN_SHORTS = [own(day) for day in range(1, 29)]
SHORTS = st.sampled_from(
    [*OWN_SHORTS, "autosnap_2026-01-01_daily", "manual", "zbackupd_manual", "zbackupd_2026"]
)


@dataclass(frozen=True)
class Situation:
    snaps: list[Snapshot]
    sent: Snapshot | None
    keep: int
    held: frozenset[str]
    in_use: frozenset[str]
    cursors: list[Bookmark]


@st.composite
def situations(draw: st.DrawFn) -> Situation:
    snaps = listing(" ".join(draw(st.lists(SHORTS, unique=True, max_size=14))))
    some_names = st.frozensets(st.sampled_from([s.name for s in snaps]), max_size=4)
    sent_index = draw(st.integers(-1, len(snaps) - 1))
    marked = draw(st.lists(st.sampled_from(snaps), max_size=3)) if snaps else []
    return Situation(
        snaps=snaps,
        sent=snaps[sent_index] if sent_index >= 0 else None,
        keep=draw(st.integers(1, 4)),
        held=draw(some_names) if snaps else frozenset(),
        in_use=draw(some_names) if snaps else frozenset(),
        cursors=[
            Bookmark(f"{s.dataset}#zbackupd_d{n}", s.guid, s.createtxg)
            for n, s in enumerate(marked)
        ],
    )


@settings(max_examples=300, deadline=None)
@given(situations())
def test_only_unprotected_older_own_snapshots_go_and_all_of_them(it: Situation) -> None:
    decision = select_own_for_destroy(
        DATASET,
        it.snaps,
        OwnSnapshotPolicy("zbackupd", it.keep),
        sent=it.sent,
        held=it.held,
        in_use=it.in_use,
        other_cursors=it.cursors,
    )
    gone = {snap.name for snap in decision.destroy}
    owned = [s for s in it.snaps if s.short_name in OWN_SHORTS]  # oldest first
    newest = {s.name for s in owned[-it.keep :]}

    assert gone <= {s.name for s in owned}  # nothing outside the prefix
    assert not gone & it.held
    assert not gone & it.in_use
    assert not gone & newest
    if it.sent is None:
        assert not gone
    else:
        assert all(s.createtxg < it.sent.createtxg for s in decision.destroy)
    oldest_cursor = min((c.createtxg for c in it.cursors), default=None)
    if oldest_cursor is not None:
        assert all(s.createtxg < oldest_cursor for s in decision.destroy)
    # Complete: every own snapshot no rule protects goes; each kept one says why.
    unprotected = {
        s.name
        for s in owned
        if it.sent is not None
        and s.createtxg < it.sent.createtxg
        and s.name not in newest | it.held | it.in_use
        and (oldest_cursor is None or s.createtxg < oldest_cursor)
    }
    assert gone == unprotected
    assert {k.snapshot.name for k in decision.keep} == {s.name for s in owned} - gone
    assert all(kept.reasons for kept in decision.keep)


# -- other disks' cursors -----------------------------------------------------------------


def test_other_cursors_are_those_of_the_other_disks_backing_up_the_source() -> None:
    config = load_config(REPO / "docs" / "examples" / "full.toml")
    first, second = config.disks  # offsite-a: backup + mail; offsite-b: backup only
    backup, mail = config.sources
    assert other_disk_labels(config, first, backup) == {"offsite-b"}
    assert other_disk_labels(config, second, backup) == {"offsite-a"}
    assert other_disk_labels(config, first, mail) == frozenset()


# -- the registry -------------------------------------------------------------------------


def test_a_lease_protects_its_names_from_other_sessions_only() -> None:
    registry = InUseRegistry()
    mine, theirs = registry.lease("run-a"), registry.lease("run-b")
    theirs.protect([f"tank/fs@{D2}"])
    asked = [f"tank/fs@{D1}", f"tank/fs@{D2}"]
    assert mine.in_use_by_others(asked) == {f"tank/fs@{D2}"}
    assert theirs.in_use_by_others(asked) == frozenset()
    assert registry.in_use(asked) == {f"tank/fs@{D2}"}


def test_a_recursive_registration_covers_descendants_by_whole_components() -> None:
    registry = InUseRegistry()
    registry.lease("run-b").protect([f"tank/fs@{D2}"], recursive=True)
    asked = [
        f"tank/fs@{D2}", f"tank/fs/a/b@{D2}", f"tank/fsx@{D2}", f"tank/fs/a@{D1}", f"tank@{D2}"
    ]
    assert registry.in_use(asked) == {f"tank/fs@{D2}", f"tank/fs/a/b@{D2}"}


def test_release_ends_the_protection_and_is_idempotent() -> None:
    registry = InUseRegistry()
    first, second = registry.lease("run-a"), registry.lease("run-b")
    name = f"tank/fs@{D2}"
    first.protect([name])
    second.protect([name])  # a same-second snapshot shared by two runs
    first.release()
    first.release()
    assert registry.in_use([name]) == {name}  # the other run still relies on it
    second.release()
    assert registry.in_use([name]) == frozenset()
    assert registry.live_leases == ()
    with pytest.raises(RuntimeError):
        first.protect([name])


# -- the commands sent to the server -------------------------------------------------------


class ScriptedRemote:
    """Answers each remote argv by its subcommand (``holds``, ``list``, ``destroy``); a
    list of answers is consumed in order. Records the calls."""

    def __init__(self, answers: dict[str, list[tuple[int, str, str]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        self.calls.append(tuple(argv))
        code, stdout, stderr = self.answers[argv[1]].pop(0)
        if check and code != 0:
            raise parse.classify_error(argv, code, stderr)
        return CommandResult(tuple(argv), code, stdout.encode(), stderr)


OK = (0, "", "")


def server_listing(
    snaps: Sequence[Snapshot], marks: Sequence[Bookmark] = ()
) -> tuple[int, str, str]:
    """The answer of ``zfs list -t snapshot,bookmark -d 1`` (name, guid, createtxg, creation)."""
    rows = [*snaps, *marks]
    return 0, "".join(f"{v.name}\t{v.guid}\t{v.createtxg}\t0\n" for v in rows), ""


LIST_ARGV = ("zfs", "list", "-H", "-p", "-t", "snapshot,bookmark", "-o",
             "name,guid,createtxg,creation", "-s", "createtxg", "-d", "1", DATASET)


async def prune_dataset(
    remote: Any,
    dataset: str,
    policy: OwnSnapshotPolicy,
    *,
    sent: Snapshot,
    other_disks: frozenset[str] | set[str] = frozenset(),
    in_use: Any = InUseView,
    own_hold_tag: str = "zbackupd_this-disk",
) -> ServerPruneDecision:
    """The daemon's server clean-up (``server/cleanup.py``) seen as the prune it does:
    its decision, or its failure raised."""
    result = await clean_up_dataset(
        remote, dataset, own_hold_tag, sent=sent, policy=policy, other_disks=other_disks,
        in_use=in_use, cursor_prefix=names.DEFAULT_PREFIX,
    )
    if result.prune_failed is not None:
        raise result.prune_failed
    assert result.decision is not None
    return result.decision


async def test_holds_are_asked_for_then_one_destroy_spares_the_held() -> None:
    snaps = listing(HISTORY)
    holds = f"{DATASET}@{D2}\tkeep\t1795317598\n"
    remote = ScriptedRemote(
        {"list": [server_listing(snaps)], "holds": [(0, holds, "")], "destroy": [OK]}
    )
    decision = await prune_dataset(remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4))
    assert decision.short_names == (D1, D3)
    assert remote.calls == [
        LIST_ARGV,
        # One ``zfs holds`` up to the sent snapshot serves this disk's stale holds too.
        ("zfs", "holds", "-H", "-p", *(f"{DATASET}@{s}" for s in (D1, D2, D3, D4))),
        ("zfs", "destroy", f"{DATASET}@{D1},{D3}"),
    ]


async def test_the_other_disks_cursor_is_read_at_prune_time() -> None:
    """Two disks' first runs at once: when this run prunes, the other has finished and its
    cursor (made after this run's planning listing) is on D3, its newest. D3 stays."""
    snaps = listing(HISTORY)
    marks = [cursor(snaps, D3, "offsite-b"), cursor(snaps, D1, "retired")]
    remote = ScriptedRemote(
        {"list": [server_listing(snaps, marks)], "holds": [OK], "destroy": [OK]}
    )
    decision = await prune_dataset(
        remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4),
        other_disks={"offsite-b"},
    )
    assert decision.short_names == (D1, D2)
    assert {k.snapshot.short_name: k.reasons for k in decision.keep}[D3] == (
        "another disk's cursor is not past it",
    )


async def test_a_lease_released_while_listing_still_protects() -> None:
    """The other session ends (lease released) while the listing is under way, and the
    listing predates its cursor: the sample taken before the listing keeps its snapshot."""
    snaps = listing(HISTORY)
    registry = InUseRegistry()
    mine, theirs = registry.lease("run-a"), registry.lease("run-b")
    theirs.protect([f"{DATASET}@{D3}"])

    class ReleasingRemote(ScriptedRemote):
        async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
            if argv[1] == "list":
                theirs.release()
            return await super().run(argv, check=check)

    remote = ReleasingRemote({"list": [server_listing(snaps)], "holds": [OK], "destroy": [OK]})
    decision = await prune_dataset(
        remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4), in_use=mine.others_now
    )
    assert registry.in_use([f"{DATASET}@{D3}"]) == frozenset()
    assert decision.short_names == (D1, D2)
    assert remote.calls[-1] == ("zfs", "destroy", f"{DATASET}@{D1},{D2}")


async def test_this_disks_stale_hold_is_released_then_pruned_others_spared() -> None:
    """A hold an interrupted transfer of this disk kept is stale once the disk holds a
    newer snapshot: released, then pruned. Another disk's hold still protects."""
    snaps = listing(HISTORY)
    holds = (f"{DATASET}@{D1}\tzbackupd_a\t1\n{DATASET}@{D2}\tzbackupd_b\t1\n"
             f"{DATASET}@{D3}\tzbackupd_a\t1\n")
    remote = ScriptedRemote({"list": [server_listing(snaps)], "holds": [(0, holds, "")],
                             "release": [OK], "destroy": [OK]})
    decision = await prune_dataset(
        remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4),
        own_hold_tag="zbackupd_a",
    )
    assert decision.short_names == (D1, D3)
    assert remote.calls[2:] == [
        ("zfs", "release", "zbackupd_a", f"{DATASET}@{D1}", f"{DATASET}@{D3}"),
        ("zfs", "destroy", f"{DATASET}@{D1},{D3}"),
    ]


async def test_nothing_to_prune_sends_no_destroy_and_no_release() -> None:
    snaps = listing(f"manual {D1}")
    remote = ScriptedRemote({"list": [server_listing(snaps)], "holds": [OK]})
    decision = await prune_dataset(remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D1))
    assert decision.destroy == ()
    assert [call[1] for call in remote.calls] == ["list", "holds"]


async def test_everything_held_sends_no_destroy() -> None:
    snaps = listing(f"{D1} {D2}")
    remote = ScriptedRemote({"list": [server_listing(snaps)],
                             "holds": [(0, f"{DATASET}@{D1}\tzbackupd_b\t1\n", "")]})
    decision = await prune_dataset(remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D2))
    assert decision.destroy == ()
    assert [call[1] for call in remote.calls] == ["list", "holds"]


async def test_in_use_is_asked_again_right_before_the_destroy() -> None:
    snaps = listing(HISTORY)
    registry = InUseRegistry()
    mine, theirs = registry.lease("run-a"), registry.lease("run-b")

    class RegisteringRemote(ScriptedRemote):
        async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
            if argv[1] == "holds":  # another run registers D1 while we wait for the answer
                theirs.protect([f"{DATASET}@{D1}"])
            return await super().run(argv, check=check)

    remote = RegisteringRemote({"list": [server_listing(snaps)], "holds": [OK], "destroy": [OK]})
    decision = await prune_dataset(
        remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4), in_use=mine.others_now
    )
    assert decision.short_names == (D2, D3)
    assert remote.calls[-1] == ("zfs", "destroy", f"{DATASET}@{D2},{D3}")


async def test_a_candidate_pruned_meanwhile_leads_to_one_fresh_listing() -> None:
    snaps = listing(HISTORY)
    gone = f"cannot open '{DATASET}@{D1}': dataset does not exist\n"
    remote = ScriptedRemote({
        "list": [server_listing(snaps), server_listing([s for s in snaps if s.short_name != D1])],
        "holds": [(1, "", gone), OK],
        "destroy": [OK],
    })
    decision = await prune_dataset(remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4))
    assert decision.short_names == (D2, D3)
    assert [call[1] for call in remote.calls] == ["list", "holds", "list", "holds", "destroy"]
    assert remote.calls[2] == LIST_ARGV


async def test_a_refused_destroy_raises_with_the_facts() -> None:
    snaps = listing(HISTORY)
    refused = "zbackupd-gate: refused: destroying is not allowed (allow_destroy = false)\n"
    remote = ScriptedRemote({"list": [server_listing(snaps)], "holds": [OK],
                             "destroy": [(126, "", refused)]})
    with pytest.raises(ServerPruneFailed) as caught:
        await prune_dataset(remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4))
    error = caught.value
    assert error.dataset == DATASET
    assert error.snapshots == (f"{DATASET}@{D1}", f"{DATASET}@{D2}", f"{DATASET}@{D3}")
    assert isinstance(error.cause, parse.GateRefused)
    assert "allow_destroy = false" in str(error)


async def test_a_failed_listing_raises_with_nothing_doomed() -> None:
    remote = ScriptedRemote({"list": [(255, "", "ssh: connection lost\n")]})
    snaps = listing(HISTORY)
    with pytest.raises(ServerPruneFailed) as caught:
        await prune_dataset(remote, DATASET, OwnSnapshotPolicy(), sent=by_short(snaps, D4))
    assert caught.value.snapshots == ()
    assert [call[1] for call in remote.calls] == ["list"]


async def test_a_held_snapshot_as_real_zfs_reports_it() -> None:
    """The captured ``zfs holds`` output (tank/secure@s1 and @s2 held) parses into names."""
    holds = (ZFS_OUTPUT / "zfs-holds.stdout").read_text()
    snaps = [
        Snapshot("tank/secure@zbackupd_20260101T000000Z", 1, 10),
        Snapshot("tank/secure@zbackupd_20260102T000000Z", 2, 20),
        Snapshot("tank/secure@zbackupd_20260103T000000Z", 3, 30),
    ]
    renamed = holds.replace("@s1", "@zbackupd_20260101T000000Z").replace(
        "@s2", "@zbackupd_20260102T000000Z"
    )
    remote = ScriptedRemote({"list": [server_listing(snaps)], "holds": [(0, renamed, "")]})
    decision = await prune_dataset(remote, "tank/secure", OwnSnapshotPolicy(), sent=snaps[2])
    assert decision.destroy == ()
    assert {kept.snapshot.guid: kept.reasons for kept in decision.keep}[1] == ("held",)
