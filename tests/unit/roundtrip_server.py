"""A scripted backup server, disk and transfer that count what a run costs (issue 16).

``RoundTripWorld`` drives the real ``Session._back_up_source`` (and through it the real
``SourceRun`` and ``DatasetReplication``) against an in-memory server whose snapshots,
bookmarks, holds and ``written`` the remote argv really change. Every remote command (a
``zfs send`` stream included) is one server round trip, recorded in ``commands``; local
``zfs`` calls on the disk are counted apart. Used by ``test_roundtrips.py`` and by
``benchmarks/bench_roundtrips.py``; it never sleeps (the benchmark multiplies the count by
a modelled latency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from zbackupd.config import Config, parse_config
from zbackupd.core.model import Bookmark, DatasetState, Snapshot
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import ProgressCallback, TransferResult
from zbackupd.service.pool import PowerSwitch
from zbackupd.service.replicate import DatasetReplication
from zbackupd.service.session import Session
from zbackupd.service.source_run import Connector, SourceDatasetInfo
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult, Runner

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx+sBj4wAc8iSK2jPAcBHI4"
START = datetime(2026, 1, 5, tzinfo=UTC)


def config_text(extra_dataset: str = "") -> str:
    return f"""
[[sources]]
name = "srv"
host = "backup.example.org"
user = "zbackupd"
host_key = "{KEY}"
keep_own_snapshots = 1

[[sources.datasets]]
root = "tank/data"
{extra_dataset}

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
"""


@dataclass
class ServerDataset:
    name: str
    written: int = 0
    volume: bool = False


@dataclass
class ScriptedServer:
    """The server as the remote argv change it; ``commands`` records every call."""

    datasets: dict[str, ServerDataset] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)
    bookmarks: list[Bookmark] = field(default_factory=list)
    holds: set[tuple[str, str]] = field(default_factory=set)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    txg: int = 100
    guid: int = 1000

    def add_dataset(self, name: str, written: int = 0) -> None:
        self.datasets[name] = ServerDataset(name, written)

    def take(self, name: str) -> Snapshot:
        """A snapshot as ``zfs snapshot`` makes it (the dataset's written drops to 0)."""
        self.txg += 1
        self.guid += 1
        snap = Snapshot(name, self.guid, self.txg, 1_767_571_200 + self.txg)
        self.snapshots.append(snap)
        self.datasets[snap.dataset].written = 0
        return snap

    async def __aenter__(self) -> ScriptedServer:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def run(self, argv: Sequence[str], *, check: bool = True,
                  timeout: float | None = None) -> CommandResult:  # fmt: skip
        argv = tuple(argv)
        self.commands.append(argv)
        code, out, err = self._answer(argv)
        if check and code != 0:
            raise parse.classify_error(argv, code, err)
        return CommandResult(argv, code, out.encode(), err)

    def _dataset_rows(self, argv: tuple[str, ...]) -> str:
        columns = argv[argv.index("-o") + 1].split(",")
        roots = argv[argv.index("-r") + 1:]
        lines = []
        for ds in sorted(self.datasets.values(), key=lambda d: d.name):
            if not any(ds.name == r or ds.name.startswith(r + "/") for r in roots):
                continue
            value = {"name": ds.name, "type": "volume" if ds.volume else "filesystem",
                     "guid": str(abs(hash(ds.name)) % 10**12 + 1), "encryption": "aes-256-gcm",
                     "encryptionroot": ds.name, "written": str(ds.written)}  # fmt: skip
            lines.append("\t".join(value[c] for c in columns) + "\n")
        return "".join(lines)

    def _versions(self, argv: tuple[str, ...]) -> str:
        if "-r" in argv:
            roots = argv[argv.index("-r") + 1:]

            def wanted(ds: str) -> bool:
                return any(ds == r or ds.startswith(r + "/") for r in roots)
        else:
            listed = set(argv[argv.index("-d") + 2:])

            def wanted(ds: str) -> bool:
                return ds in listed
        kinds = argv[argv.index("-t") + 1]
        versions: list[Snapshot | Bookmark] = []
        if "snapshot" in kinds:
            versions += self.snapshots
        if "bookmark" in kinds:
            versions += self.bookmarks
        rows = sorted((v for v in versions if wanted(v.dataset)), key=lambda v: v.createtxg)
        return "".join(f"{v.name}\t{v.guid}\t{v.createtxg}\t{v.creation}\n" for v in rows)

    def _answer(self, argv: tuple[str, ...]) -> tuple[int, str, str]:  # noqa: PLR0911, PLR0912 -- one case per verb
        verb = argv[1]
        if verb == "list" and "filesystem,volume" in argv:
            return 0, self._dataset_rows(argv), ""
        if verb == "list":
            return 0, self._versions(argv), ""
        if verb == "snapshot":
            existing = {s.name for s in self.snapshots}
            if any(name in existing for name in argv[2:]):
                return 1, "", f"cannot create snapshot '{argv[2]}': dataset already exists\n"
            for name in argv[2:]:
                self.take(name)
        elif verb == "send":  # only estimates come here; streams go through the streamer
            return 0, "size\t4096\n", ""
        elif verb == "bookmark":
            snap = next(s for s in self.snapshots if s.name == argv[2])
            self.bookmarks.append(Bookmark(argv[3], snap.guid, snap.createtxg, snap.creation))
        elif verb == "destroy" and "#" in argv[2]:
            self.bookmarks = [b for b in self.bookmarks if b.name != argv[2]]
        elif verb == "destroy":
            dataset, _, shorts = argv[2].partition("@")
            gone = {f"{dataset}@{short}" for short in shorts.split(",")}
            if any(name == snap for snap, _ in self.holds for name in gone):
                return 1, "", f"cannot destroy snapshot {argv[2]}: dataset is busy\n"
            self.snapshots = [s for s in self.snapshots if s.name not in gone]
        elif verb == "hold":
            self.holds |= {(snap, argv[2]) for snap in argv[3:]}
        elif verb == "release":
            self.holds -= {(snap, argv[2]) for snap in argv[3:]}
        elif verb == "holds":
            wanted = set(argv[4:])
            known = {s.name for s in self.snapshots}
            held = [f"{s}\t{t}\t1\n" for s, t in sorted(self.holds) if s in wanted]
            missing = wanted - known
            if missing:
                return 1, "".join(held), f"cannot open '{min(missing)}': dataset does not exist\n"
            return 0, "".join(held), ""
        return 0, "", ""

    def count(self, *verbs: str) -> int:
        return sum(1 for c in self.commands if not verbs or c[1] in verbs)


@dataclass
class ScriptedDisk:
    """The disk pool's side, as the ``Zfs`` facade answers it; ``calls`` counts local zfs."""

    copies: dict[str, list[Snapshot]] = field(default_factory=dict)
    placeholders: set[str] = field(default_factory=set)
    calls: int = 0

    async def list_datasets(self, roots: Sequence[str]) -> tuple[parse.DatasetRow, ...]:
        self.calls += 1
        return ()

    async def create_placeholder(self, dataset: str) -> None:
        self.calls += 1
        self.placeholders.add(dataset)

    async def dataset_state(self, target: str) -> DatasetState:
        self.calls += 2  # zfs get + zfs list
        if target not in self.copies:
            raise parse.DatasetNotFound(("zfs", "get"), 1, f"cannot open '{target}': "
                                        "dataset does not exist")  # fmt: skip
        return DatasetState(target, tuple(self.copies[target]))

    async def get_properties(
        self, datasets: Sequence[str], properties: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        self.calls += 1
        return {name: {"encryptionroot": name} for name in datasets}

    async def destroy_snapshots(self, dataset: str, short_names: Sequence[str]) -> None:
        self.calls += 1
        gone = {f"{dataset}@{short}" for short in short_names}
        self.copies[dataset] = [s for s in self.copies[dataset] if s.name not in gone]


@dataclass
class ScriptedStreamer:
    """Lands what a ``zfs send`` carries on the disk; one server command per stream."""

    server: ScriptedServer
    disk: ScriptedDisk

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
        self.server.commands.append(("zfs", "send", *send_argv[2:]))
        target, to = receive_argv[-1], send_argv[-1]
        by_name = {s.name: s for s in self.server.snapshots}
        start = by_name.get(send_argv[-2]) if "-I" in send_argv else None
        landing = [s for s in self.server.snapshots if start is not None and
                   s.dataset == by_name[to].dataset and
                   start.createtxg < s.createtxg < by_name[to].createtxg]  # fmt: skip
        landing.append(by_name[to])
        copies = self.disk.copies.setdefault(target, [])
        for snap in landing:
            copies.append(Snapshot(f"{target}@{snap.short_name}", snap.guid,
                                   10**6 + snap.createtxg, snap.creation))  # fmt: skip
        result = CommandResult(tuple(send_argv), 0, b"", "")
        return TransferResult(4096, 0.01, result, result)


class _Session(Session):
    """The real session with the scripted transfer in each dataset's replication."""

    streamer: ScriptedStreamer
    options: dict[str, Any]

    def replication(
        self, source: Any, remote: RemoteHost, info: SourceDatasetInfo, *, index: int,
        total: int,
    ) -> DatasetReplication:  # fmt: skip
        return DatasetReplication(
            config=self.config, disk=self.pool.as_imported, source=source, info=info,
            remote=remote, zfs=self._zfs, runner=self._runner, in_use=self._in_use,
            now=self._now, report=self._enter, log=self._log, index=index, total=total,
            streamer=self.streamer,
        )  # fmt: skip


@dataclass
class RoundTripWorld:
    """A server with ``datasets`` datasets under ``tank/data``, one disk, and runs."""

    config: Config
    server: ScriptedServer
    disk: ScriptedDisk
    registry: InUseRegistry = field(default_factory=InUseRegistry)
    runs: int = 0

    @classmethod
    def build(cls, datasets: int, *, extra_dataset: str = "") -> RoundTripWorld:
        server = ScriptedServer()
        server.add_dataset("tank/data", written=4096)
        for n in range(datasets - 1):
            server.add_dataset(f"tank/data/ds{n:05d}", written=4096)
        config = parse_config(config_text(extra_dataset), source="bench.toml")
        return cls(config, server, ScriptedDisk())

    def session(self, label: str = "offsite-a") -> Session:
        disk = next(d for d in self.config.disks if d.label == label)
        self.runs += 1
        now = START + timedelta(hours=self.runs)
        server = self.server

        async def connect(_: object) -> ScriptedServer:
            return server

        run = _Session(
            config=self.config, disk=disk, import_device="/dev/disk/by-id/usb-x-part1",
            power_device="/dev/sdz", zfs=cast(Zfs, self.disk), runner=cast(Runner, None),
            connect=cast(Connector, connect), power=cast(PowerSwitch, None),
            report=lambda _: None, pool_key=bytearray, snapshots_in_use=self.registry,
            now=lambda: now, run_id=f"run-{self.runs}",
        )  # fmt: skip
        run.streamer = ScriptedStreamer(self.server, self.disk)
        return run

    async def back_up(self, label: str = "offsite-a") -> tuple[list[tuple[str, ...]], Session]:
        """One source's backup of the disk ``label``; returns the server commands it cost."""
        run = self.session(label)
        before = len(self.server.commands)
        try:
            for source in self.config.sources_for(run.disk):
                failure = await run._attempt(source)  # one try, as the session makes it
                if failure is not None:
                    raise failure
        finally:
            run._in_use.release()
        return self.server.commands[before:], run

    def write(self, *datasets: str, size: int = 4096) -> None:
        for name in datasets:
            self.server.datasets[name].written += size
