"""The pool's life when something is wrong (issue 12): a wrong disk key, a pool named
otherwise on disk, a pool someone imported by hand, two disks whose pools share a name, a
failed power-off, a pool suspended under a failed transfer. Each test runs a whole
``Session`` against ``fakehost.FakeHost``, whose zpool/zfs answers follow the pools' state
with OpenZFS 2.3.2's messages; what ZFS really does is the VM suite's business
(tests/vm/test_faults_pool.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from fakehost import FakeHost, FakeMapper, FakePool, FakePower, import_block
from hypothesis import given
from hypothesis import strategies as st
from test_session_prune import CONFIG

from zbackupd.config import Config
from zbackupd.core.model import DatasetState, Encryption
from zbackupd.core.status import DiskStatus, Phase, keep_history
from zbackupd.disk.devmap import DeviceMapper
from zbackupd.disk.power import DiskStillInUse
from zbackupd.keys.derivation import KeyStore
from zbackupd.server.prune import InUseRegistry
from zbackupd.service.daemon import Daemon
from zbackupd.service.notify import NullNotifier
from zbackupd.service.pool import PowerSwitch, temporary_pool_name
from zbackupd.service.replicate import DatasetOutcome, DatasetReplication
from zbackupd.service.session import Session
from zbackupd.service.source_run import Connector, SourceDatasetInfo, SourceRun
from zbackupd.service.store import DatasetResult, RunRecord, StateStore
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.facade import Zfs

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DISK_A = CONFIG.disks[0]  # offsite-a, pool "zbackup"
DISK_B = CONFIG.disks[1]  # offsite-b, pool "zbackup" too
#: No sources: the session opens the pool, unlocks it and closes it (the pool's life alone).
POOL_ONLY = cast(Config, CONFIG.model_copy(update={"sources": ()}))
BY_ID = "/dev/disk/by-id/usb-x-part1"
CAPTURES = Path(__file__).resolve().parents[1] / "data/zfs-output"


async def _no_connect(_: object) -> object:
    raise AssertionError("no source in these tests")


def make_session(
    host: FakeHost,
    *,
    disk: str = "offsite-a",
    mapper: FakeMapper | None = None,
    power: FakePower | None = None,
    key: bytes = KEY,
    config: Config = POOL_ONLY,
) -> Session:
    chosen = next(d for d in config.disks if d.label == disk)
    return Session(
        config=config,
        disk=chosen,
        import_device=BY_ID,
        power_device="/dev/sdz",
        zfs=Zfs(host),
        runner=host,
        connect=cast(Connector, _no_connect),
        power=cast(PowerSwitch, power if power is not None else FakePower()),
        report=lambda _: None,
        pool_key=lambda: bytearray(key),
        snapshots_in_use=InUseRegistry(),
        device_mapper=cast(DeviceMapper, mapper if mapper is not None else FakeMapper()),
        run_id=f"run-{disk}",
    )


# -- 1: a wrong disk key ------------------------------------------------------------------


async def test_a_wrong_disk_key_is_refused_and_the_pool_exported_unmapped_left_powered() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "zbackup", OTHER_KEY)])
    mapper, power = FakeMapper(), FakePower()
    session = make_session(host, mapper=mapper, power=power)
    record = await session.run()
    assert session.status.phase is Phase.REFUSED, session.status
    message = session.status.message
    assert "another installation or passphrase" in message
    assert "pool exported" in message
    assert "left powered on" in message
    assert not record.ok
    assert host.imported() == {}
    assert "zfs unload-key" not in host.commands()  # keystatus said there is nothing to unload
    assert mapper.mappings == {}
    assert power.devices == []  # a refused disk of ours stays on for the admin to inspect


async def test_a_failed_key_unload_still_exports() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "zbackup", KEY)],
                    fail={"zfs unload-key": (1, "", "cannot unload key: pool is busy\n")})
    session = make_session(host)
    record = await session.run()
    assert session.status.phase is Phase.DONE, session.status
    assert record.ok
    assert host.imported() == {}


# -- 2: a pool named otherwise on disk ----------------------------------------------------


async def test_a_pool_named_otherwise_on_disk_is_refused_and_not_left_imported() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "intruder", KEY)])
    mapper = FakeMapper()
    session = make_session(host, mapper=mapper)
    await session.run()
    assert session.status.phase is Phase.REFUSED, session.status
    assert "'intruder'" in session.status.message
    assert "'zbackup'" in session.status.message
    assert host.imported() == {}
    assert host.pool(DISK_A.pool_guid).name == "intruder"
    assert mapper.mappings == {}


async def test_the_on_disk_name_is_checked_before_anything_is_imported() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "intruder", KEY)])
    await make_session(host).run()
    imports = [argv for argv in host.calls if argv[:2] == ("zpool", "import")]
    assert imports == [("zpool", "import", "-d", "/dev/mapper/zbackupd-offsite-a")]


# -- 6: disks whose pools share a name ----------------------------------------------------


def test_the_import_names_the_pool_temporarily() -> None:
    argv = zargv.zpool_import("/dev/mapper/zbackupd-a", 7, temp_name="zbackupd-a")
    assert argv == ("zpool", "import", "-d", "/dev/mapper/zbackupd-a", "-N", "-o",
                    "cachefile=none", "-t", "7", "zbackupd-a")
    assert "-t" not in zargv.zpool_import("/dev/mapper/zbackupd-a", 7)
    assert zargv.zpool_import_listing("/dev/mapper/zbackupd-a") == (
        "zpool", "import", "-d", "/dev/mapper/zbackupd-a")


@given(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True))
def test_every_config_label_gives_a_valid_temporary_pool_name(label: str) -> None:
    name = temporary_pool_name(label)
    assert names.validate_pool_name(name) == name
    assert name.endswith(label)


def test_the_import_listing_gives_names_and_guids() -> None:
    captured = (CAPTURES / "zpool-import-list.stdout").read_text()
    assert parse.parse_import_listing(captured) == (
        parse.ImportablePool("xpool", 8943481835789602437, "ONLINE"),)
    two = import_block(FakePool(5, "backup", KEY)) + import_block(FakePool(6, "other", KEY))
    assert parse.parse_import_listing(two) == (
        parse.ImportablePool("backup", 5, "ONLINE"), parse.ImportablePool("other", 6, "ONLINE"))
    assert parse.parse_import_listing("") == ()


async def test_two_disks_whose_pools_share_a_name_are_backed_up_at_once() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "zbackup", KEY),
                     FakePool(DISK_B.pool_guid, "zbackup", KEY)], meet_at_load_key=2)
    first, second = make_session(host), make_session(host, disk="offsite-b")
    await asyncio.gather(first.run(), second.run())
    assert [first.status.phase, second.status.phase] == [Phase.DONE, Phase.DONE], (
        first.status, second.status)
    assert host.imported() == {}
    # The temporary names never reached the disks.
    assert [p.name for p in host.pools] == ["zbackup", "zbackup"]
    after_import = {argv[-1] for argv in host.calls
                    if argv[:2] in {("zfs", "load-key"), ("zpool", "export"), ("zfs", "get")}}
    assert after_import == {"zbackupd-offsite-a", "zbackupd-offsite-b"}
    # They really overlapped: both pools were imported when the keys were loaded.
    assert host.commands().count("zfs load-key") == 2


# -- 3: a pool imported by someone else ---------------------------------------------------

ZBACKUPD_TOUCHES = {"zpool reopen", "zpool clear", "zpool export", "zpool import",
                    "zfs load-key", "zfs unload-key"}


async def test_a_pool_imported_by_hand_is_refused_and_left_exactly_as_it_is() -> None:
    by_hand = FakePool(DISK_A.pool_guid, "zbackup", KEY, imported_as="zbackup", vdev=BY_ID,
                       key_loaded=True)
    host = FakeHost([by_hand])
    mapper, power = FakeMapper(), FakePower()
    record = await make_session(host, mapper=mapper, power=power).run()
    assert not record.ok
    assert "refused: pool zbackup is imported by someone else: export it to let zbackupd " \
        "back up this disk" in record.summary
    assert set(host.commands()) & ZBACKUPD_TOUCHES == set()
    assert (by_hand.imported_as, by_hand.vdev, by_hand.key_loaded) == ("zbackup", BY_ID, True)
    assert mapper.calls == []
    assert power.devices == []


async def test_a_pool_under_zbackupds_name_but_not_through_its_mapping_is_not_taken() -> None:
    odd = FakePool(DISK_A.pool_guid, "zbackup", KEY, imported_as="zbackupd-offsite-a",
                   vdev=BY_ID)
    host = FakeHost([odd])
    session = make_session(host)
    await session.run()
    assert session.status.phase is Phase.REFUSED, session.status
    assert "imported by someone else" in session.status.message
    assert set(host.commands()) & ZBACKUPD_TOUCHES == set()
    assert odd.imported_as == "zbackupd-offsite-a"


async def test_a_pool_zbackupd_left_imported_through_its_mapping_is_revived_and_exported(
) -> None:
    ours = FakePool(DISK_A.pool_guid, "zbackup", KEY, imported_as="zbackupd-offsite-a",
                    vdev="/dev/mapper/zbackupd-offsite-a")
    host = FakeHost([ours])
    mapper = FakeMapper({"zbackupd-offsite-a": "/dev/disk/by-id/old-part1"})
    session = make_session(host, mapper=mapper)
    record = await session.run()
    assert record.ok, record
    assert host.commands()[:4] == ["zpool list", "zpool status", "zpool list", "zpool reopen"]
    assert mapper.calls[0] == ("repoint", "zbackupd-offsite-a", BY_ID)
    assert host.imported() == {}
    assert mapper.mappings == {}


# -- 5: a failed power-off, and the last success across failures --------------------------


async def test_a_failed_power_off_is_a_warning_on_a_good_run() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "zbackup", KEY)])
    power = FakePower(DiskStillInUse("sdz9", "sdz", ("holder",)))
    session = make_session(host, power=power)
    record = await session.run()
    assert record.ok, record
    assert session.status.phase is Phase.DONE, session.status
    assert record.summary.startswith("ok; warning: disk offsite-a not powered off")
    assert "sdz9 is still in use" in record.summary
    assert "pool exported" in record.summary
    assert session.status.last_success == record.finished
    assert host.imported() == {}


def _record(run_id: str, finished: float, ok: bool) -> RunRecord:
    return RunRecord(run_id, "offsite-a", "SERIAL-A", finished - 60, finished, ok,
                     "ok" if ok else "failed: boom")


class _Watcher:
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def begin_session(self, disk: object) -> None: ...

    def end_session(self, disk: object) -> None: ...


def _daemon(store: StateStore) -> Daemon:
    host = FakeHost([])
    return Daemon(CONFIG, zfs=Zfs(host), runner=host, keystore=cast(KeyStore, None),
                  store=store, notifier=NullNotifier(), watcher_factory=lambda _: _Watcher())


def test_the_last_success_comes_from_the_store_whatever_the_last_run_was(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_run(_record("good", 1000.0, True))
    store.record_run(_record("bad", 2000.0, False))
    [disk] = _daemon(store).status.disks
    assert (disk.phase, disk.last_result, disk.last_success) == (Phase.FAILED, "failed: boom",
                                                                 1000.0)


def test_a_status_without_history_keeps_the_known_last_result_and_success() -> None:
    known = DiskStatus("offsite-a", "SERIAL-A", Phase.DONE, last_result="ok", last_success=1e3)
    running = DiskStatus("offsite-a", "SERIAL-A", Phase.TRANSFERRING)
    failed = DiskStatus("offsite-a", "SERIAL-A", Phase.FAILED, last_result="failed: x")
    assert keep_history(known, running) == replace(running, last_result="ok", last_success=1e3)
    assert keep_history(known, failed) == replace(failed, last_success=1e3)
    assert keep_history(None, failed) == failed
    newer = replace(failed, last_success=2e3)
    assert keep_history(known, newer) == newer


# -- 7: a pool suspended under a failed transfer ------------------------------------------


class _Remote:
    async def __aenter__(self) -> _Remote:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None


class _Listing:
    refused: tuple[object, ...] = ()  # no row refused by the name grammar

    """One source listing with two selected datasets (what ``SourceRun`` hands over)."""

    def __init__(self) -> None:
        config = CONFIG.sources[0].datasets[0]
        self.selected = tuple(
            SourceDatasetInfo(name, Encryption.ENCRYPTED, f"zbackupd-offsite-a/backup/{name}",
                              config)
            for name in ("tank/a", "tank/b"))

    def state(self, dataset: str) -> DatasetState:
        return DatasetState(dataset, ())


class _Work:
    async def take_snapshots(self) -> datetime:
        return datetime(2026, 1, 5, tzinfo=UTC)

    async def list(self) -> _Listing:
        return _Listing()

    async def ensure_parents(self, _: object) -> None:
        return None


class _FailingTransfer:
    """The first dataset's transfer fails as the pool suspends (the disk was pulled);
    a later one would hang on the suspended pool, so it must not start."""

    def __init__(self, host: FakeHost, name: str, started: list[str]) -> None:
        self.host, self.name, self.started = host, name, started

    async def run(self, *_: object) -> DatasetOutcome:
        self.started.append(self.name)
        self.host.pool(DISK_A.pool_guid).health = "SUSPENDED"
        return DatasetOutcome(DatasetResult(self.name, "failed: receive failed"),
                              f"{self.name}: receive failed after 12 bytes")


class _SessionOverSource(Session):
    def __init__(self, host: FakeHost, started: list[str], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._host, self._started = host, started

    def source_run(self, source: object, remote: object) -> SourceRun:
        return cast(SourceRun, _Work())

    def replication(self, source: object, remote: object, info: SourceDatasetInfo, *,
                    index: int, total: int) -> DatasetReplication:
        return cast(DatasetReplication, _FailingTransfer(self._host, info.name, self._started))


async def test_a_pool_suspended_under_a_failed_transfer_ends_the_session_as_suspended() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "zbackup", KEY)])
    started: list[str] = []

    async def connect(_: object) -> _Remote:
        return _Remote()

    base = make_session(host, config=CONFIG)
    session = _SessionOverSource(
        host, started, config=CONFIG, disk=DISK_A, import_device=BY_ID,
        power_device="/dev/sdz", zfs=Zfs(host), runner=host, connect=connect,
        power=FakePower(), report=lambda _: None, pool_key=lambda: bytearray(KEY),
        snapshots_in_use=InUseRegistry(), device_mapper=FakeMapper(), run_id=base.run_id)
    record = await session.run()
    assert started == ["tank/a"]
    assert session.status.phase is Phase.SUSPENDED, session.status
    assert "re-plug disk offsite-a" in record.summary
    assert "zbackupd-offsite-a" in host.imported()  # left for the re-plug's revival


async def test_a_pool_that_does_not_answer_counts_as_suspended() -> None:
    host = FakeHost([FakePool(DISK_A.pool_guid, "zbackup", KEY)], fail={"zpool list": None})
    with pytest.raises(parse.PoolSuspended, match="does not answer"):
        await make_session(host).pool.raise_if_suspended()
    assert host.calls[0][-1] == "zbackupd-offsite-a"
