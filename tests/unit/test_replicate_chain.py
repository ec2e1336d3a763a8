"""Issue 11, one dataset's chain of custody: the cursor is never absent (created before
the old one goes), follows every completed step, the hold outlives the cursor move,
volumes are received as volumes, a run snapshots exactly the selected datasets, and this
disk's stale holds are released whatever the snapshot mode.

A scripted server (``FakeServer``: snapshots, bookmarks and holds that the remote argv
really change), a scripted disk (``FakeDisk``) and a scripted transfer (``FakeStreamer``)
drive the real ``DatasetReplication`` and ``SourceRun``; ``events`` is the one ordered
record of what reached the server and the transfer.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import structlog

from zbackupd.config import SourceDataset, parse_config
from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot
from zbackupd.server import gate
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import ProgressCallback, TransferFailed, TransferResult
from zbackupd.service.replicate import DatasetReplication
from zbackupd.service.source_run import SourceDatasetInfo, SourceRun
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult, Runner

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx+sBj4wAc8iSK2jPAcBHI4"
CONFIG = parse_config(
    f"""
[[sources]]
name = "backup"
host = "backup.example.org"
user = "zbackupd"
host_key = "{KEY}"
keep_own_snapshots = 1

[[sources.datasets]]
root = "tank/a"
exclude = ["skip"]

[[sources.datasets]]
root = "tank/b"
recursive = false
snapshots = "reuse"
reuse_pattern = "autosnap_*"

[[sources.datasets]]
root = "tank/c"
recursive = false

[retention]
keep_last = 50

[[disks]]
label = "offsite-a"
serial = "SERIAL-A"
pool_guid = "11856427362548921357"
pool_name = "zbackup"

[[disks]]
label = "offsite-b"
serial = "SERIAL-B"
pool_guid = "5307193027441285118"
pool_name = "zbackup"
""",
    source="test.toml",
)
SOURCE = CONFIG.sources[0]
CREATE, REUSE, FLAT = SOURCE.datasets
DISK = CONFIG.disks[0]
NOW = datetime(2026, 1, 5, tzinfo=UTC)
LEGACY = "tank/a#zbackupd_offsite-a"
TAG = "zbackupd_offsite-a"


def own(day: int, dataset: str = "tank/a") -> Snapshot:
    """The server's own run snapshot of day ``day``: guid ``day``, createtxg ``10*day``."""
    return Snapshot(f"{dataset}@zbackupd_2026010{day}T000000Z", day, 10 * day)


def mark(name: str, snap: Snapshot) -> Bookmark:
    return Bookmark(name, snap.guid, snap.createtxg)


Event = tuple[str, ...]


@dataclass
class FakeServer:
    """The backup server as the remote argv change it; every call lands in ``events``."""

    events: list[Event]
    snapshots: list[Snapshot] = field(default_factory=list)
    bookmarks: list[Bookmark] = field(default_factory=list)
    holds: set[tuple[str, str]] = field(default_factory=set)  # (snapshot, tag)
    datasets: str = ""  # the answer to the dataset listing
    fail: set[str] = field(default_factory=set)  # subcommands that fail

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        argv = tuple(argv)
        self.events.append(argv)
        code, out, err = self._answer(argv)
        if argv[1] in self.fail:
            code, out, err = 1, "", "cannot do that: pool or dataset is busy"
        if check and code != 0:
            raise parse.classify_error(argv, code, err)
        return CommandResult(argv, code, out.encode(), err)

    def _answer(self, argv: Event) -> tuple[int, str, str]:
        verb = argv[1]
        if verb == "list" and "filesystem,volume" in argv:
            return 0, self.datasets, ""
        if verb == "list":
            dataset = argv[-1]
            versions: list[Snapshot | Bookmark] = [*self.snapshots, *self.bookmarks]
            lines = [f"{v.name}\t{v.guid}\t{v.createtxg}\t0\n" for v in versions
                     if v.dataset == dataset]  # fmt: skip
            return 0, "".join(lines), ""
        if verb == "bookmark":
            snap = next(s for s in self.snapshots if s.name == argv[2])
            if any(b.name == argv[3] for b in self.bookmarks):
                return 1, "", f"cannot create bookmark '{argv[3]}': bookmark exists\n"
            self.bookmarks.append(mark(argv[3], snap))
        elif verb == "destroy" and "#" in argv[2]:
            self.bookmarks = [b for b in self.bookmarks if b.name != argv[2]]
        elif verb == "destroy":
            dataset, _, shorts = argv[2].partition("@")
            gone = {f"{dataset}@{short}" for short in shorts.split(",")}
            self.snapshots = [s for s in self.snapshots if s.name not in gone]
        elif verb == "hold":
            self.holds |= {(snap, argv[2]) for snap in argv[3:]}
        elif verb == "release":
            self.holds -= {(snap, argv[2]) for snap in argv[3:]}
        elif verb == "holds":
            held = [f"{s}\t{t}\t1\n" for s, t in sorted(self.holds) if s in argv[4:]]
            return 0, "".join(held), ""
        return 0, "", ""

    def cursors(self, label: str = "offsite-a") -> list[str]:
        return [b.name for b in self.bookmarks if f"#zbackupd_{label}" in b.name]


@dataclass
class FakeDisk:
    """The disk's copies: ``{target: [snapshots]}``; a missing key is a missing dataset."""

    copies: dict[str, list[Snapshot]] = field(default_factory=dict)

    async def dataset_state(self, target: str) -> DatasetState:
        if target not in self.copies:
            raise parse.DatasetNotFound(("zfs", "get"), 1, f"cannot open '{target}': "
                                        "dataset does not exist")
        return DatasetState(target, tuple(self.copies[target]))

    async def get_properties(
        self, datasets: Sequence[str], properties: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        return {name: {"encryptionroot": name} for name in datasets}

    async def destroy_snapshots(self, dataset: str, short_names: Sequence[str]) -> None:
        raise AssertionError(f"nothing to prune on the disk here: {dataset} {short_names}")


@dataclass
class FakeStreamer:
    """Lands the sent snapshot (and an ``-I`` stream's intermediates) on the disk; a send
    to a snapshot in ``cut`` lands ``cut[name]`` of them, then fails as a cut link does."""

    events: list[Event]
    server: FakeServer
    disk: FakeDisk
    cut: dict[str, int] = field(default_factory=dict)
    receives: list[tuple[str, ...]] = field(default_factory=list)

    async def __call__(
        self,
        remote: RemoteHost,
        send_argv: Sequence[str],
        runner: Runner,
        receive_argv: Sequence[str],
        *,
        estimated_total: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TransferResult:
        self.events.append(("stream", *send_argv))
        self.receives.append(tuple(receive_argv))
        target, to = receive_argv[-1], send_argv[-1]
        by_name = {s.name: s for s in self.server.snapshots}
        start = send_argv[-2] if "-I" in send_argv else None
        landing = [s for s in self.server.snapshots
                   if start is not None and by_name[start].createtxg < s.createtxg
                   < by_name[to].createtxg]  # fmt: skip
        landing.append(by_name[to])
        if to in self.cut:
            landing = landing[: self.cut[to]]
        copies = self.disk.copies.setdefault(target, [])
        for snap in landing:
            copies.append(Snapshot(f"{target}@{snap.short_name}", snap.guid,
                                   1000 + snap.createtxg))  # fmt: skip
        result = CommandResult(tuple(send_argv), 0, b"", "")
        if to in self.cut:
            cause = parse.StreamInterrupted(tuple(receive_argv), 1, "cannot receive: "
                                            "checksum mismatch or incomplete stream")
            raise TransferFailed("receive", cause, other=None, bytes_transferred=7)
        return TransferResult(1 << 20, 1.0, result, result)


@dataclass
class World:
    events: list[Event]
    server: FakeServer
    disk: FakeDisk
    streamer: FakeStreamer

    def replication(self, info: SourceDatasetInfo) -> DatasetReplication:
        return DatasetReplication(
            config=CONFIG, disk=DISK, source=SOURCE, info=info,
            remote=cast(RemoteHost, self.server), zfs=cast(Zfs, self.disk),
            runner=cast(Runner, None), in_use=InUseRegistry().lease("run-a"),
            now=lambda: NOW, report=lambda *_, **__: None, log=structlog.get_logger(),
            index=0, total=1, streamer=self.streamer,
        )  # fmt: skip

    async def run(self, info: SourceDatasetInfo) -> tuple[str, str | None]:
        name = info.name
        snaps = [s for s in self.server.snapshots if s.dataset == name]
        marks = [b for b in self.server.bookmarks if b.dataset == name]
        outcome = await self.replication(info).run(snaps, marks)
        return outcome.result.outcome, outcome.problem

    def index(self, *prefix: str) -> int:
        """Where the first event starting with ``prefix`` is (fails when there is none)."""
        return next(n for n, event in enumerate(self.events) if event[: len(prefix)] == prefix)


def world(snapshots: Sequence[Snapshot], bookmarks: Sequence[Bookmark] = (),
          disk: dict[str, list[Snapshot]] | None = None) -> World:  # fmt: skip
    events: list[Event] = []
    server = FakeServer(events, list(snapshots), list(bookmarks))
    fake_disk = FakeDisk(disk or {})
    return World(events, server, fake_disk, FakeStreamer(events, server, fake_disk))


TARGET = "zbackup/backup/backup/tank/a"


def info(config: SourceDataset = CREATE, name: str = "tank/a", *,
         volume: bool = False) -> SourceDatasetInfo:  # fmt: skip
    target = f"zbackup/backup/backup/{name}"
    if volume:
        return SourceDatasetInfo(name, Encryption.ENCRYPTED, target, config, volume=True)
    return SourceDatasetInfo(name, Encryption.ENCRYPTED, target, config)


def on_disk(*days: int) -> dict[str, list[Snapshot]]:
    return {TARGET: [Snapshot(f"{TARGET}@{own(d).short_name}", d, 1000 + 10 * d) for d in days]}


# -- A: the cursor move is create-then-destroy ------------------------------------------


async def test_a_moved_cursor_is_created_before_the_old_one_is_destroyed() -> None:
    w = world([own(1), own(2), own(3)], [mark(LEGACY, own(1))], on_disk(1))
    outcome, problem = await w.run(info())
    assert problem is None, outcome
    [new] = w.server.cursors()
    assert new != LEGACY
    assert new.startswith(LEGACY)
    assert w.index("zfs", "bookmark", own(3).name, new) < w.index("zfs", "destroy", LEGACY)


async def test_the_cursor_is_the_newest_of_this_disks_cursor_bookmarks() -> None:
    """A crash after creating the new cursor and before destroying the old left two: the
    newest is the cursor (the disk is up to date with it); the older one is cleaned up."""
    newer = f"{LEGACY}:{own(3).guid}"
    w = world([own(1), own(2), own(3)], [mark(LEGACY, own(1)), mark(newer, own(3))],
              on_disk(1, 3))  # fmt: skip
    outcome, problem = await w.run(info())
    assert (outcome, problem) == ("up to date", None)
    assert not [e for e in w.events if e[1] == "bookmark"]
    assert w.server.cursors() == [newer]


async def test_another_disks_suffixed_cursor_still_protects_on_the_server() -> None:
    """offsite-b's cursor is on day 2 under its new-style name: days 2 and later stay."""
    days = [own(day) for day in range(1, 6)]
    w = world(days, [mark(f"tank/a#zbackupd_offsite-b:{own(2).guid}", own(2))])
    await w.replication(info()).prune_server(days[-1])
    destroyed = [e[2] for e in w.events if e[1] == "destroy"]
    assert destroyed == [f"tank/a@{own(1).short_name}"]


def no_lookup(argv: tuple[str, ...]) -> str:
    """The gate asks the server nothing for bookmarks, destroys and listings."""
    raise AssertionError(f"unexpected gate lookup {argv}")


def test_the_gate_allows_exactly_own_suffixed_cursor_names() -> None:
    config = gate.GateConfig(roots=("tank/a",))
    snap = own(3).name
    for name in ("zbackupd_offsite-a:3", "zbackupd_offsite-a", "zbackupd_a_5:18446744073709551615"):
        made = gate.decide(f"zfs bookmark {snap} tank/a#{name}", config, no_lookup)
        assert isinstance(made, gate.Accepted)
        gone = gate.decide(f"zfs destroy tank/a#{name}", config, no_lookup)
        assert isinstance(gone, gate.Accepted)
    for name in ("zbackupd_offsite-a:", "zbackupd_offsite-a:3a", "zbackupd_offsite-a:1:2",
                 "zbackupd_:3", "zbackupd_offsite-a:" + "9" * 21, "other_offsite-a:3"):
        refused = gate.decide(f"zfs destroy tank/a#{name}", config, no_lookup)
        assert isinstance(refused, gate.Refused), name


# -- B: the cursor follows every completed step; the hold outlives the move -------------


async def test_the_hold_is_released_only_after_the_cursor_moved_past_it() -> None:
    w = world([own(1), own(2)], [mark(LEGACY, own(1))], on_disk(1))
    await w.run(info())
    held = own(2).name
    assert w.index("zfs", "hold", TAG, held) < w.index("stream")
    assert w.index("zfs", "bookmark", held) < w.index("zfs", "release", TAG, held)
    assert w.server.holds == set()


async def test_the_cursor_follows_each_completed_step_of_a_chain() -> None:
    """From a bookmark (day 1 is gone on the server) the plan is ``-i #cursor day2`` then
    ``-I day2 day4``; the second stream is cut before it lands anything. The cursor is at
    day 2, what the disk holds, and day 4 stays held for the resume."""
    w = world([own(2), own(3), own(4)], [mark(LEGACY, own(1))], on_disk(1))
    w.streamer.cut = {own(4).name: 0}
    outcome, problem = await w.run(info())
    assert outcome.startswith("failed")
    assert problem is not None
    assert w.server.cursors() == [f"{LEGACY}:{own(2).guid}"]
    assert w.index("zfs", "bookmark", own(2).name) < w.index("stream", "zfs", "send", "-w", "-I")
    assert w.server.holds == {(own(4).name, TAG)}


async def test_a_cut_chain_moves_the_cursor_to_what_the_disk_has() -> None:
    """One ``-I day1 day4`` stream cut after days 2 and 3 landed: the cursor follows the
    disk to day 3."""
    w = world([own(1), own(2), own(3), own(4)], [mark(LEGACY, own(1))], on_disk(1))
    w.streamer.cut = {own(4).name: 2}
    outcome, _ = await w.run(info())
    assert outcome.startswith("failed")
    assert w.server.cursors() == [f"{LEGACY}:{own(3).guid}"]


# -- C: volumes ---------------------------------------------------------------------------


def test_the_dataset_listing_says_which_are_volumes() -> None:
    argv = zargv.list_datasets(["tank/a"])
    columns = argv[argv.index("-o") + 1].split(",")
    assert columns[:2] == ["name", "type"]
    rows = parse.parse_datasets("tank/a\tfilesystem\t1\toff\t-\t0\n"
                                "tank/a/vol\tvolume\t2\toff\t-\t4096\n")
    assert [(r.name, r.volume) for r in rows] == [("tank/a", False), ("tank/a/vol", True)]
    assert isinstance(gate.decide(" ".join(argv), gate.GateConfig(roots=("tank/a",)), no_lookup),
                      gate.Accepted)  # fmt: skip


async def test_a_volume_is_received_without_a_device_node_or_mount_properties() -> None:
    vol = own(1, "tank/a/vol")
    w = world([vol])
    outcome, problem = await w.run(info(name="tank/a/vol", volume=True))
    assert problem is None, outcome
    [receive] = w.streamer.receives
    assert receive[receive.index("volmode=none") - 1:][:2] == ("-o", "volmode=none")
    assert "readonly=on" in receive
    assert not {"canmount=noauto", "mountpoint=none", "mountpoint"} & set(receive)


# -- D: one atomic snapshot of exactly the selected datasets ---------------------------


async def test_the_run_snapshot_covers_exactly_the_selected_datasets() -> None:
    events: list[Event] = []
    server = FakeServer(events, datasets="".join(
        f"{name}\tfilesystem\t{n}\toff\t-\t4096\n" for n, name in enumerate(
            ["tank/a", "tank/a/child", "tank/a/skip", "tank/a/skip/deep", "tank/b",
             "tank/c", "tank/c/child"], start=1)))  # fmt: skip
    registry = InUseRegistry()
    work = SourceRun(disk=DISK, source=SOURCE, remote=cast(RemoteHost, server),
                     zfs=cast(Zfs, None), in_use=registry.lease("run-a"), now=lambda: NOW,
                     log=structlog.get_logger())  # fmt: skip
    await work.take_snapshots()
    listing = await work.list()
    short = "zbackupd_20260105T000000Z"
    snapshots = [e for e in events if e[1] == "snapshot"]
    assert snapshots == [("zfs", "snapshot", *(f"{d}@{short}" for d in
                                               ("tank/a", "tank/a/child", "tank/c")))]
    assert events.index(snapshots[0]) < next(n for n, e in enumerate(events)
                                         if "snapshot,bookmark" in e)  # fmt: skip
    assert [s.name for s in listing.selected] == ["tank/a", "tank/a/child", "tank/b", "tank/c"]
    assert registry.in_use([f"tank/a/skip@{short}"]) == frozenset()
    assert registry.in_use([f"tank/a/child@{short}"]) == {f"tank/a/child@{short}"}


async def test_a_name_the_grammar_refuses_fails_only_its_dataset() -> None:
    """One dataset with a name zbackupd cannot handle (here a snapshot name with a space)
    must not sink the listing: the others are listed and planned, it is refused with its
    reason (issue 11.11)."""
    events: list[Event] = []
    server = FakeServer(events, [own(1), own(1, "tank/c")], datasets=(
        "tank/a\tfilesystem\t1\toff\t-\t0\n"
        "tank/a/bad name\tfilesystem\t2\toff\t-\t0\n"
        "tank/c\tfilesystem\t3\toff\t-\t0\n"))  # fmt: skip
    server.snapshots.append(Snapshot("tank/c@my snap", 99, 5))
    work = SourceRun(disk=DISK, source=SOURCE, remote=cast(RemoteHost, server),
                     zfs=cast(Zfs, None), in_use=InUseRegistry().lease("run-a"), now=lambda: NOW,
                     log=structlog.get_logger())  # fmt: skip
    await work.take_snapshots()
    listing = await work.list()
    assert [s.name for s in listing.selected] == ["tank/a"]
    assert sorted(row.dataset for row in listing.refused) == ["tank/a/bad name", "tank/c"]
    assert all("name grammar refuses" in row.explain() for row in listing.refused)


# -- E: this disk's stale holds go in every mode ----------------------------------------


async def test_this_disks_stale_holds_are_released_in_reuse_mode_too() -> None:
    auto = [Snapshot(f"tank/b@autosnap_{day}", day, 10 * day) for day in range(1, 5)]
    w = world(auto)
    w.server.holds = {(auto[0].name, TAG), (auto[1].name, "zbackupd_offsite-b"),
                      (auto[3].name, TAG)}  # fmt: skip
    await w.replication(info(REUSE, "tank/b")).prune_server(auto[2])
    # Older than what the disk now holds: stale. Another disk's and a newer one stay.
    assert w.server.holds == {(auto[1].name, "zbackupd_offsite-b"), (auto[3].name, TAG)}
    assert not [e for e in w.events if e[1] == "destroy"]


async def test_a_stale_hold_on_a_prune_candidate_is_released_then_the_candidate_goes() -> None:
    """One listing and one ``zfs holds`` serve both: release, then one destroy."""
    days = [own(day) for day in range(1, 4)]
    w = world(days)
    w.server.holds = {(days[0].name, TAG)}
    await w.replication(info()).prune_server(days[-1])
    assert [e[1] for e in w.events] == ["list", "holds", "release", "destroy"]
    assert w.server.holds == set()
    assert [s.name for s in w.server.snapshots] == [days[-1].name]


async def test_a_failed_release_keeps_what_it_was_to_free_and_prunes_the_rest() -> None:
    days = [own(day) for day in range(1, 4)]
    w = world(days)
    w.server.holds = {(days[0].name, TAG)}
    w.server.fail = {"release"}
    await w.replication(info()).prune_server(days[-1])
    destroyed = [e[2] for e in w.events if e[1] == "destroy"]
    assert destroyed == [f"tank/a@{days[1].short_name}"]


# -- F: one prefix for run snapshots, holds and cursors ----------------------------------

SITE = parse_config(
    f"""
[[sources]]
name = "backup"
host = "backup.example.org"
user = "zbackupd"
host_key = "{KEY}"

[[sources.datasets]]
root = "tank/a"
snapshot_prefix = "site"

[[disks]]
label = "offsite-a"
serial = "SERIAL-A"
pool_guid = "11856427362548921357"
pool_name = "zbackup"
""",
    source="site.toml",
)


async def test_a_configured_prefix_names_the_holds_and_cursors_as_the_gate_expects() -> None:
    """The gate configured with ``prefix = "site"`` accepts only site_ names: the daemon's
    holds and cursors must carry the source's prefix too, not the default."""
    site = [Snapshot(f"tank/a@site_2026010{day}T000000Z", day, 10 * day) for day in (1, 2)]
    first = world(site[:1])
    source = SITE.sources[0]
    config = source.datasets[0]

    def replication(w: World) -> DatasetReplication:
        return DatasetReplication(
            config=SITE, disk=SITE.disks[0], source=source, info=info(config),
            remote=cast(RemoteHost, w.server), zfs=cast(Zfs, w.disk),
            runner=cast(Runner, None), in_use=InUseRegistry().lease("run-a"),
            now=lambda: NOW, report=lambda *_, **__: None, log=structlog.get_logger(),
            index=0, total=1, streamer=w.streamer,
        )  # fmt: skip

    outcome = await replication(first).run(site[:1], [])
    assert outcome.problem is None, outcome
    second = world(site, first.server.bookmarks, first.disk.copies)
    outcome = await replication(second).run(site, second.server.bookmarks)
    assert outcome.problem is None, outcome
    gate_config = gate.GateConfig(roots=("tank/a",), prefix="site")
    issued = [e for e in (*first.events, *second.events) if e[0] == "zfs"
              and e[1] in ("hold", "release", "bookmark", "destroy")]  # fmt: skip
    assert {e[1] for e in issued} >= {"hold", "release", "bookmark"}
    for argv in issued:
        decision = gate.decide(shlex.join(argv), gate_config, no_lookup)
        assert isinstance(decision, gate.Accepted), decision
    assert all(b.short_name.startswith("site_offsite-a") for b in second.server.bookmarks)
