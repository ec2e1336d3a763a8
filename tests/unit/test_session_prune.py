"""The session's part in pruning its own snapshots on the server: the run snapshot is
registered before it is taken, the prune after a moved cursor asks for holds and destroys
in one call (sparing what another configured disk may still need), a failure only warns,
and the session's registrations end with it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import structlog

from zbackupd.config import SourceDataset, parse_config
from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import RemoteHost
from zbackupd.service.pool import PowerSwitch
from zbackupd.service.replicate import DatasetReplication
from zbackupd.service.session import Session
from zbackupd.service.source_run import Connector, SourceDatasetInfo
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult

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

[[sources.datasets]]
root = "tank/b"
recursive = false
snapshots = "reuse"
reuse_pattern = "autosnap_*"

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
CREATE, REUSE = SOURCE.datasets
NOW = datetime(2026, 1, 5, tzinfo=UTC)
#: This run's snapshot (taken at NOW, recursively) on the root and on a descendant.
RUN_SNAPSHOTS = ("tank/a@zbackupd_20260105T000000Z", "tank/a/child@zbackupd_20260105T000000Z")


class FailingRunner:
    """Every local command fails: enough for a session that must end early."""

    async def run(self, argv: Sequence[str], **_: object) -> CommandResult:
        return CommandResult(tuple(argv), 1, b"", "boom")


class FakeRemote:
    """Answers remote argv by subcommand; records calls and the registry at each call."""

    def __init__(
        self, registry: InUseRegistry, answers: dict[str, tuple[int, str, str]] | None = None
    ) -> None:
        self.registry = registry
        self.answers = answers or {}
        self.calls: list[tuple[str, ...]] = []
        self.in_use_at_call: list[frozenset[str]] = []

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        self.calls.append(tuple(argv))
        self.in_use_at_call.append(self.registry.in_use(RUN_SNAPSHOTS))
        code, stdout, stderr = self.answers.get(argv[1], (0, "", ""))
        if check and code != 0:
            raise parse.classify_error(argv, code, stderr)
        return CommandResult(tuple(argv), code, stdout.encode(), stderr)


def session(registry: InUseRegistry, label: str = "offsite-a") -> Session:
    disk = next(d for d in CONFIG.disks if d.label == label)
    runner = FailingRunner()

    async def no_connect(_: object) -> object:
        raise AssertionError("not connected in these tests")

    return Session(
        config=CONFIG,
        disk=disk,
        import_device="/dev/disk/by-id/usb-x-part1",
        power_device="/dev/sdz",
        zfs=Zfs(runner),
        runner=runner,
        connect=cast(Connector, no_connect),
        power=cast(PowerSwitch, None),
        report=lambda _: None,
        pool_key=bytearray,
        snapshots_in_use=registry,
        now=lambda: NOW,
        run_id="run-a",
    )


def server_state(dataset: str = "tank/a") -> tuple[DatasetState, Snapshot]:
    snaps = tuple(
        Snapshot(f"{dataset}@zbackupd_2026010{day}T000000Z", day, 10 * day) for day in range(1, 6)
    )
    marks = (
        Bookmark(f"{dataset}#zbackupd_offsite-b", 2, 20),  # the other disk: at day 2
        Bookmark(f"{dataset}#zbackupd_retired", 1, 10),  # no longer configured
    )
    return DatasetState(dataset, snaps, marks), snaps[-1]


def listed(state: DatasetState) -> tuple[int, str, str]:
    """``state`` as ``zfs list -t snapshot,bookmark -d 1`` prints it."""
    rows = [*state.snapshots, *state.bookmarks]
    return 0, "".join(f"{v.name}\t{v.guid}\t{v.createtxg}\t0\n" for v in rows), ""


def info(config: SourceDataset = CREATE, name: str = "tank/a") -> SourceDatasetInfo:
    return SourceDatasetInfo(name, Encryption.ENCRYPTED, f"zbackup/backup/backup/{name}", config)


def remote_host(fake: FakeRemote) -> RemoteHost:
    return cast(RemoteHost, fake)


def replication(run: Session, fake: FakeRemote, dataset: SourceDatasetInfo) -> DatasetReplication:
    return run.replication(SOURCE, remote_host(fake), dataset, index=0, total=1)


async def test_the_run_snapshot_is_registered_before_it_is_taken() -> None:
    registry = InUseRegistry()
    rows = "".join(f"{ds}\tfilesystem\t{n}\toff\t-\t4096\n"
                   for n, ds in enumerate(("tank/a", "tank/a/child", "tank/b"), start=1))
    remote = FakeRemote(registry, {"list": (0, rows, "")})
    await session(registry).source_run(SOURCE, remote_host(remote)).take_snapshots()
    # Listed first; then one atomic snapshot of exactly the selected create-mode datasets.
    assert remote.calls[0][:2] == ("zfs", "list")
    assert remote.calls[1:] == [("zfs", "snapshot", *RUN_SNAPSHOTS)]
    assert remote.in_use_at_call[1:] == [set(RUN_SNAPSHOTS)]


async def test_a_prune_spares_what_the_other_disk_may_need() -> None:
    registry = InUseRegistry()
    state, final = server_state()
    remote = FakeRemote(registry, {"list": listed(state)})
    with structlog.testing.capture_logs() as logs:
        await replication(session(registry), remote, info()).prune_server(final)
    # Listed afresh at prune time; one ``zfs holds`` of every snapshot up to the sent one
    # (this disk's stale holds, none here, and the candidates'); offsite-b's cursor is at
    # day 2: days 2-4 may still be on their way to it. Three commands in all.
    days = [f"tank/a@zbackupd_2026010{day}T000000Z" for day in range(1, 6)]
    assert remote.calls[0][:2] == ("zfs", "list")
    assert remote.calls[0][-1] == "tank/a"
    assert remote.calls[1:] == [
        ("zfs", "holds", "-H", "-p", *days),
        ("zfs", "destroy", "tank/a@zbackupd_20260101T000000Z"),
    ]
    [pruned] = [entry for entry in logs if entry["event"].startswith("pruned")]
    assert pruned["dataset"] == "tank/a"
    assert pruned["destroyed"] == ["zbackupd_20260101T000000Z"]
    assert pruned["log_level"] == "info"


async def test_a_refused_prune_warns_with_the_facts_and_does_not_raise() -> None:
    registry = InUseRegistry()
    refused = "zbackupd-gate: refused: destroying is not allowed (allow_destroy = false)\n"
    state, final = server_state()
    remote = FakeRemote(registry, {"list": listed(state), "destroy": (126, "", refused)})
    with structlog.testing.capture_logs() as logs:
        await replication(session(registry, "offsite-b"), remote, info()).prune_server(final)
    [warning] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert "allow_destroy = false" in warning["event"]
    assert warning["dataset"] == "tank/a"
    assert warning["error_type"] == "GateRefused"
    # offsite-a has no cursor here: for offsite-b, all but the sent snapshot could go.
    assert warning["snapshots"] == [f"tank/a@zbackupd_2026010{day}T000000Z" for day in range(1, 5)]


async def test_reuse_mode_prunes_nothing_on_the_server() -> None:
    registry = InUseRegistry()
    state, final = server_state("tank/b")
    remote = FakeRemote(registry, {"list": listed(state)})
    await replication(session(registry), remote, info(REUSE, "tank/b")).prune_server(final)
    # Only this disk's stale holds are looked for (none here); nothing is destroyed.
    assert [call[1] for call in remote.calls] == ["list", "holds"]


async def test_the_sessions_registrations_end_with_it() -> None:
    registry = InUseRegistry()
    run = session(registry)
    await run.source_run(SOURCE, remote_host(FakeRemote(registry))).take_snapshots()
    assert len(registry.live_leases) == 1
    record = await run.run()  # the import fails at once: the session ends
    assert not record.ok
    assert registry.live_leases == ()
