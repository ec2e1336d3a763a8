"""The pool's life when something is wrong (issue 12): a wrong disk key, a pool named
otherwise on disk, a pool someone imported by hand, two disks whose pools share a name, a
failed power-off, a pool suspended under a failed transfer. Each test runs a whole
``Session`` against ``fakehost.FakeHost``, whose zpool/zfs answers follow the pools' state
with OpenZFS 2.3.2's messages; what ZFS really does is the VM suite's business
(tests/vm/test_faults_pool.py)."""

from __future__ import annotations

from typing import cast

from fakehost import FakeHost, FakeMapper, FakePool, FakePower
from test_session_prune import CONFIG

from zbackupd.config import Config
from zbackupd.core.status import Phase
from zbackupd.disk.devmap import DeviceMapper
from zbackupd.server.prune import InUseRegistry
from zbackupd.service.pool import PowerSwitch
from zbackupd.service.session import Session
from zbackupd.service.source_run import Connector
from zbackupd.zfs.facade import Zfs

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DISK_A = CONFIG.disks[0]  # offsite-a, pool "zbackup"
DISK_B = CONFIG.disks[1]  # offsite-b, pool "zbackup" too
#: No sources: the session opens the pool, unlocks it and closes it (the pool's life alone).
POOL_ONLY = cast(Config, CONFIG.model_copy(update={"sources": ()}))
BY_ID = "/dev/disk/by-id/usb-x-part1"


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
