"""Issue 12 #4: one source's failure is that source's, not the session's; transient ones
are retried with backoff while the disk is attached, permanent ones are not.

A whole ``Session`` runs against ``fakehost.FakeHost`` (the pool's life) with two
sources whose connection, snapshot and datasets are scripted; the clock and the sleep
are injected (no real waiting). What SSH and ZFS really do is the integration and VM
suites' business (tests/integration/test_transfer.py, tests/vm/test_faults_net.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import pytest
from fakehost import FakeHost, FakeMapper, FakePool, FakePower

from zbackupd.config import Config, Source, parse_config
from zbackupd.core.model import DatasetState, Encryption
from zbackupd.core.status import DiskStatus, Phase
from zbackupd.disk.devmap import DeviceMapper
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import HostKeyRejected, RemoteHost, RemoteUnavailable
from zbackupd.server.transfer import TransferFailed, TransferResult, TransferStalled
from zbackupd.service.pool import PowerSwitch
from zbackupd.service.replicate import DatasetOutcome, DatasetReplication
from zbackupd.service.session import Session
from zbackupd.service.source_run import Connector, SourceDatasetInfo, SourceRun
from zbackupd.service.store import DatasetResult
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult

KEY = bytes(range(32))
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx+sBj4wAc8iSK2jPAcBHI4"


def two_sources(daemon: str = "") -> Config:
    sources = "".join(
        f'[[sources]]\nname = "{name}"\nhost = "{name}.example.org"\nuser = "zbackupd"\n'
        f'host_key = "{HOST_KEY}"\n\n[[sources.datasets]]\nroot = "tank/{name}"\n\n'
        for name in ("nas", "web")
    )
    return parse_config(
        f"[daemon]\n{daemon}\n{sources}"
        '[[disks]]\nlabel = "offsite-a"\nserial = "SERIAL-A"\n'
        'pool_guid = "11856427362548921357"\npool_name = "zbackup"\n',
        source="test.toml",
    )


DEFAULTS = two_sources()
GUID = DEFAULTS.disks[0].pool_guid


@dataclass
class Clock:
    """Monotonic time that only the fake sleep moves."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Remote:
    link_failure: ZbackupdError | None = None

    async def __aenter__(self) -> _Remote:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None


class _Listing:
    refused: tuple[object, ...] = ()  # no row refused by the name grammar

    def __init__(self, source: Source) -> None:
        dataset = source.datasets[0]
        self.selected = (SourceDatasetInfo(dataset.root, Encryption.ENCRYPTED,
                                           f"zbackupd-offsite-a/backup/{source.name}/"
                                           f"{dataset.root}", dataset),)
        self.snapshots: tuple[object, ...] = ()
        self.bookmarks: tuple[object, ...] = ()

    def state(self, dataset: str) -> DatasetState:
        return DatasetState(dataset, ())


class _Work:
    def __init__(self, source: Source) -> None:
        self.source = source

    async def take_snapshots(self) -> datetime:
        return datetime(2026, 1, 5, tzinfo=UTC)

    async def list(self) -> _Listing:
        return _Listing(self.source)

    async def ensure_parents(self, _: object) -> None:
        return None


#: What a source's connection does on each attempt: "ok", or an error to raise.
Script = dict[str, list[object]]


class _Replication:
    """Transfers through the session's streamer, as ``DatasetReplication`` does, and turns
    a failure into a problem (the dataset's failure is its own)."""

    def __init__(self, session: ScriptedSession, source: str, info: SourceDatasetInfo) -> None:
        self.session, self.source, self.info = session, source, info

    async def run(self, *_: object) -> DatasetOutcome:
        self.session.transfers_started.append(self.source)
        try:
            result = await self.session.transfers(
                cast(RemoteHost, _Remote()), ("zfs", "send"), self.session.host,
                ("zfs", "receive"))
        except ZbackupdError as error:
            return DatasetOutcome(DatasetResult(self.info.name, f"failed: {error}"),
                                  f"{self.info.name}: {error}")
        return DatasetOutcome(DatasetResult(self.info.name, "sent", result.bytes_transferred,
                                            "zbackupd_20260105T000000Z"))


class ScriptedSession(Session):
    def __init__(self, host: FakeHost, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.host = host
        self.transfers_started: list[str] = []

    def source_run(self, source: Source, remote: RemoteHost) -> SourceRun:
        return cast(SourceRun, _Work(source))

    def replication(self, source: Source, remote: RemoteHost, info: SourceDatasetInfo, *,
                    index: int, total: int) -> DatasetReplication:
        return cast(DatasetReplication, _Replication(self, source.name, info))


def _stalled() -> TransferStalled:
    return TransferStalled(("zfs", "send"), stalled_for=300.0, bytes_transferred=4096)


def _link_cut() -> TransferFailed:
    cause = RemoteUnavailable("nas.example.org", 22, "Server not responding to keepalive")
    return TransferFailed("send", cause, other=None, bytes_transferred=8192)


def make(
    config: Config,
    *,
    connect_script: Script | None = None,
    transfer_script: dict[str, list[ZbackupdError | None]] | None = None,
    clock: Clock | None = None,
    statuses: list[DiskStatus] | None = None,
    power: FakePower | None = None,
) -> tuple[ScriptedSession, FakeHost]:
    host = FakeHost([FakePool(GUID, "zbackup", KEY)])
    connects = {name: list(steps) for name, steps in (connect_script or {}).items()}
    transfers = {name: list(steps) for name, steps in (transfer_script or {}).items()}
    current: list[str] = []

    async def connect(source: Source) -> _Remote:
        current[:] = [source.name]
        steps = connects.get(source.name)
        step = steps.pop(0) if steps else "ok"
        if isinstance(step, ZbackupdError):
            raise step
        return _Remote()

    async def streamer(*_: object, **__: object) -> TransferResult:
        steps = transfers.get(current[0])
        step = steps.pop(0) if steps else None
        if step is not None:
            raise step
        done = CommandResult(("zfs",), 0, b"", "")
        return TransferResult(1000, 1.0, done, done)

    tick = clock or Clock()
    seen = statuses if statuses is not None else []
    session = ScriptedSession(
        host, config=config, disk=config.disks[0], import_device="/dev/disk/by-id/x-part1",
        power_device="/dev/sdz", zfs=Zfs(host), runner=host,
        connect=cast(Connector, connect), power=cast(PowerSwitch, power or FakePower()),
        report=seen.append, pool_key=lambda: bytearray(KEY),
        snapshots_in_use=InUseRegistry(),
        device_mapper=cast(DeviceMapper, FakeMapper()), run_id="run-a",
        streamer=streamer, clock=tick, sleep=tick.sleep,
    )
    return session, host


def retrying(statuses: Sequence[DiskStatus]) -> list[str]:
    return [s.message for s in statuses if s.phase is Phase.RETRYING]


# -- one source down: the other is backed up, the disk exported and powered off ------------


async def test_a_refused_source_does_not_stop_the_next_and_the_disk_is_powered_off() -> None:
    power = FakePower()
    refused = HostKeyRejected("nas.example.org", 22, "SHA256:pinned", "SHA256:other")
    clock = Clock()
    session, host = make(DEFAULTS, connect_script={"nas": [refused]}, power=power, clock=clock)
    record = await session.run()
    assert session.transfers_started == ["web"]
    assert [r.dataset for r in record.datasets] == ["tank/web"]
    assert not record.ok
    assert record.summary.startswith("finished with problems: source nas: host key of "
                                     "nas.example.org:22 rejected"), record.summary
    assert session.status.phase is Phase.DONE
    assert host.imported() == {}
    assert power.devices == ["/dev/sdz"]  # the run ended normally: exported, powered off
    assert clock.sleeps == []  # permanent: never retried


async def test_an_unreachable_server_is_retried_with_backoff_until_it_answers() -> None:
    down = RemoteUnavailable("nas.example.org", 22, "Network is unreachable")
    clock, statuses = Clock(), []
    session, _ = make(DEFAULTS, connect_script={"nas": [down, down, "ok"]}, clock=clock,
                      statuses=statuses)
    record = await session.run()
    assert record.ok, record.summary
    assert session.transfers_started == ["web", "nas"]  # the other source did not wait
    # 10 s, then 20 s: refreshed on the way (at most every 10 s); nothing slept for real.
    assert sum(clock.sleeps) == 30
    messages = retrying(statuses)
    assert messages[0].startswith("retrying server nas in 10 s, attempt 2/8: SSH connection "
                                  "to nas.example.org:22 unavailable"), messages
    assert any(m.startswith("retrying server nas in 20 s, attempt 3/8") for m in messages)
    assert any(m.startswith("retrying server nas in 10 s, attempt 3/8") for m in messages)


async def test_a_transient_failure_beyond_the_window_is_reported_per_source() -> None:
    down = RemoteUnavailable("nas.example.org", 22, "Connection refused")
    config = two_sources("retry_window_seconds = 60\nretry_backoff_seconds = [10, 20]\n")
    clock, power = Clock(), FakePower()
    session, host = make(config, connect_script={"nas": [down] * 10}, clock=clock, power=power)
    record = await session.run()
    # 10 + 20 + 20 = 50 s of waiting fit the 60 s window: 4 attempts, the 5th would not.
    assert sum(clock.sleeps) == 50
    assert not record.ok
    assert record.summary == (
        "finished with problems: source nas: SSH connection to nas.example.org:22 "
        "unavailable: Connection refused (gave up after 4 attempts in 50s)")
    assert session.transfers_started == ["web"]
    assert host.imported() == {}
    assert power.devices == ["/dev/sdz"]


async def test_a_window_of_zero_disables_retries() -> None:
    down = RemoteUnavailable("nas.example.org", 22, "Connection refused")
    clock = Clock()
    session, _ = make(two_sources("retry_window_seconds = 0\n"),
                      connect_script={"nas": [down, "ok"]}, clock=clock)
    record = await session.run()
    assert clock.sleeps == []
    assert record.summary == ("finished with problems: source nas: SSH connection to "
                              "nas.example.org:22 unavailable: Connection refused")


@pytest.mark.parametrize("failure", [_stalled, _link_cut], ids=["stalled", "link-cut"])
async def test_a_transfer_interrupted_transiently_is_retried_from_a_fresh_plan(
    failure: Callable[[], ZbackupdError],
) -> None:
    clock, statuses = Clock(), []
    session, _ = make(DEFAULTS, transfer_script={"nas": [failure()]}, clock=clock,
                      statuses=statuses)
    record = await session.run()
    assert record.ok, record.summary
    # The retry lists and plans again (the planner then resumes from the token).
    assert session.transfers_started == ["nas", "web", "nas"]
    assert [r.dataset for r in record.datasets] == ["tank/nas", "tank/web"]
    assert all(r.outcome == "sent" for r in record.datasets)
    assert retrying(statuses)[0].startswith("retrying server nas in 10 s, attempt 2/8")


async def test_a_permanent_transfer_failure_is_not_retried() -> None:
    clock = Clock()
    modified = PermanentError("destination tank/nas has been modified")
    session, _ = make(DEFAULTS, transfer_script={"nas": [modified]}, clock=clock)
    record = await session.run()
    assert clock.sleeps == []
    assert session.transfers_started == ["nas", "web"]
    assert record.summary == ("finished with problems: source nas: tank/nas: destination "
                              "tank/nas has been modified")
