"""udev events → matches: the pure matcher and tracker, and the watcher on a real loop.

Property sets follow what udev showed in the QEMU guest for a hot-plugged usb-storage disk
(vm-notes.md): ``ID_BUS=usb``, ``ID_SERIAL_SHORT=<serial>``,
``ID_SERIAL=QEMU_QEMU_HARDDISK_<serial>-0:0``, and on the pool's partition
``ID_FS_TYPE=zfs_member``, ``ID_FS_UUID=<pool guid in decimal>``, ``ID_FS_LABEL=<pool>``.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

import pytest

from zbackupd.core.model import DiskIdentity
from zbackupd.disk.udev import (
    Candidate,
    DiskEvent,
    DiskTracker,
    Impostor,
    Match,
    NotOurs,
    Removed,
    SerialMismatch,
    UdevEventMalformed,
    choose_by_id_link,
    match_disk,
)
from zbackupd.disk.udevwatch import UdevMonitorFailed, UdevWatcher

GUID_A = 15370374377066419745
GUID_B = 7299116547373322011
GUID_STRANGER = 1234567890123456789

DISK_A = DiskIdentity(serial="OFFSITE-A", pool_guid=GUID_A, pool_name="xa", label="offsite-a")
DISK_B = DiskIdentity(serial="OFFSITE-B", pool_guid=GUID_B, pool_name="xb", label="offsite-b")
KNOWN = (DISK_A, DISK_B)


def usb_disk_props(
    serial: str, *, sd: str = "sda", host: int = 2, port: str = "2-1", action: str | None = "add"
) -> dict[str, str]:
    """The whole-disk node of a QEMU usb-storage disk: serial, no filesystem."""
    model = f"QEMU_QEMU_HARDDISK_{serial}-0:0"
    props = {
        "DEVPATH": f"/devices/pci0000:00/0000:00:05.0/usb2/{port}/{port}:1.0/host{host}/"
        f"target{host}:0:0/{host}:0:0:0/block/{sd}",
        "SUBSYSTEM": "block",
        "DEVNAME": f"/dev/{sd}",
        "DEVTYPE": "disk",
        "ID_BUS": "usb",
        "ID_MODEL": "QEMU_HARDDISK",
        "ID_SERIAL": model,
        "ID_SERIAL_SHORT": serial,
        "ID_PART_TABLE_TYPE": "gpt",
        "DEVLINKS": f"/dev/disk/by-path/pci-0000:00:05.0-usb-0:1:1.0-scsi-0:0:0:0 "
        f"/dev/disk/by-id/usb-{model}",
    }
    if action is not None:
        props["ACTION"] = action
    return props


def usb_partition_props(
    serial: str,
    guid: int | str | None,
    *,
    sd: str = "sda",
    part: int = 1,
    host: int = 2,
    port: str = "2-1",
    action: str | None = "add",
    pool: str = "xa",
) -> dict[str, str]:
    """A partition of that disk; with ``guid`` it is the pool's zfs_member partition."""
    disk = usb_disk_props(serial, sd=sd, host=host, port=port, action=action)
    model = disk["ID_SERIAL"]
    props = {
        **{k: v for k, v in disk.items() if k != "ID_PART_TABLE_TYPE"},
        "DEVPATH": f"{disk['DEVPATH']}/{sd}{part}",
        "DEVNAME": f"/dev/{sd}{part}",
        "DEVTYPE": "partition",
        "PARTN": str(part),
        "DEVLINKS": f"/dev/disk/by-partuuid/6b1e0a2c-8f3d-ab41-9e0d-3c2f1f0c{part:04d} "
        f"/dev/disk/by-path/pci-0000:00:05.0-usb-0:1:1.0-scsi-0:0:0:0-part{part} "
        f"/dev/disk/by-id/usb-{model}-part{part}",
    }
    if guid is not None:
        props |= {
            "ID_FS_TYPE": "zfs_member",
            "ID_FS_USAGE": "filesystem",
            "ID_FS_VERSION": "5000",
            "ID_FS_UUID": str(guid),
            "ID_FS_UUID_ENC": str(guid),
            "ID_FS_LABEL": pool,
            "ID_FS_LABEL_ENC": pool,
        }
        props["DEVLINKS"] += f" /dev/disk/by-label/{pool} /dev/disk/by-uuid/{guid}"
    return props


def event(props: Mapping[str, str], *, coldplug: bool = False) -> DiskEvent:
    return DiskEvent.from_properties(props, coldplug=coldplug)


# --- DiskEvent ---------------------------------------------------------------------------


def test_event_carries_the_facts_of_a_zfs_member_partition() -> None:
    ev = event(usb_partition_props("OFFSITE-A", GUID_A, sd="sdc"))
    assert ev.action == "add"
    assert ev.device_path.endswith("/block/sdc/sdc1")
    assert ev.device_node == "/dev/sdc1"
    assert ev.devtype == "partition"
    assert ev.serial == "OFFSITE-A"
    assert ev.bus == "usb"
    assert ev.is_zfs_member
    assert ev.pool_guid == GUID_A
    assert ev.fs_label == "xa"
    assert ev.by_id_link == "/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_OFFSITE-A-0:0-part1"
    assert ev.import_path == ev.by_id_link
    assert not ev.coldplug


def test_enumerated_device_without_action_is_a_coldplug_add() -> None:
    ev = event(usb_partition_props("OFFSITE-A", GUID_A, action=None), coldplug=True)
    assert ev.action == "add"
    assert ev.coldplug


def test_event_without_devpath_is_refused_with_the_keys_seen() -> None:
    props = usb_partition_props("OFFSITE-A", GUID_A)
    del props["DEVPATH"]
    with pytest.raises(UdevEventMalformed) as caught:
        event(props)
    assert caught.value.missing == "DEVPATH"
    assert "ID_FS_UUID" in caught.value.keys


def test_non_decimal_fs_uuid_is_no_pool_guid() -> None:
    ev = event(usb_partition_props("OFFSITE-A", "3f1c-22aa"))
    assert ev.pool_guid is None


@pytest.mark.parametrize(
    ("devlinks", "expected"),
    [
        (
            "/dev/disk/by-id/wwn-0x50014ee2b5c6d7e8-part1"
            " /dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1AB2CD3-part1"
            " /dev/disk/by-uuid/15370374377066419745",
            "/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1AB2CD3-part1",
        ),
        (
            "/dev/disk/by-id/scsi-SQEMU_HD_S-part1"
            " /dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_OFFSITE-A-0:0-part1",
            "/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_OFFSITE-A-0:0-part1",
        ),
        (
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4-part1 /dev/disk/by-path/pci-0000:00:1f.2-part1",
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4-part1",
        ),
        ("/dev/disk/by-path/pci-0000:00:1f.2-ata-1-part1 /dev/disk/by-uuid/1", None),
        ("", None),
    ],
)
def test_by_id_link_prefers_usb_and_ata(devlinks: str, expected: str | None) -> None:
    assert choose_by_id_link(devlinks) == expected


def test_import_path_falls_back_to_the_device_node_without_a_by_id_link() -> None:
    props = usb_partition_props("OFFSITE-A", GUID_A, sd="sdd")
    props["DEVLINKS"] = "/dev/disk/by-uuid/15370374377066419745"
    assert event(props).import_path == "/dev/sdd1"


# --- match_disk --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "kind", "identity"),
    [
        pytest.param(usb_partition_props("OFFSITE-A", GUID_A), Candidate, DISK_A, id="disk-a"),
        pytest.param(
            usb_partition_props("OFFSITE-B", GUID_B, pool="xb"), Candidate, DISK_B, id="disk-b"
        ),
        pytest.param(usb_disk_props("OFFSITE-A"), NotOurs, None, id="whole-disk-node"),
        pytest.param(
            usb_partition_props("OFFSITE-A", None, part=9), NotOurs, None, id="reserved-part9"
        ),
        pytest.param(
            usb_partition_props("STRANGER", GUID_STRANGER), NotOurs, None, id="foreign-pool"
        ),
        pytest.param(
            {
                **usb_partition_props("OFFSITE-A", None),
                "ID_FS_TYPE": "ext4",
                "ID_FS_UUID": "0b1c6a4e-2f7e-4d43-9d55-0d0c0e6f3a11",
            },
            NotOurs,
            None,
            id="configured-serial-other-filesystem",
        ),
        pytest.param(
            usb_partition_props("OFFSITE-A", GUID_STRANGER), Impostor, DISK_A, id="impostor"
        ),
        pytest.param(
            usb_partition_props("OFFSITE-A", "not-a-guid"),
            Impostor,
            DISK_A,
            id="impostor-unreadable-guid",
        ),
        pytest.param(
            usb_partition_props("BRIDGE-LIES", GUID_A),
            SerialMismatch,
            DISK_A,
            id="guid-under-unknown-serial",
        ),
        pytest.param(
            usb_partition_props("OFFSITE-B", GUID_A),
            SerialMismatch,
            DISK_A,
            id="guid-of-a-under-serial-of-b",
        ),
        pytest.param(
            usb_partition_props("OFFSITE-A", GUID_A, action="remove"),
            Removed,
            DISK_A,
            id="remove",
        ),
        pytest.param(
            usb_partition_props("STRANGER", GUID_STRANGER, action="remove"),
            NotOurs,
            None,
            id="remove-foreign",
        ),
    ],
)
def test_match_disk(
    props: dict[str, str], kind: type[Match], identity: DiskIdentity | None
) -> None:
    result = match_disk(event(props), KNOWN)
    assert type(result) is kind
    if identity is not None:
        assert not isinstance(result, NotOurs)
        assert result.identity == identity


def test_impostor_reports_the_guid_it_saw() -> None:
    result = match_disk(event(usb_partition_props("OFFSITE-A", GUID_STRANGER)), KNOWN)
    assert isinstance(result, Impostor)
    assert result.seen_guid == GUID_STRANGER
    assert str(GUID_STRANGER) in result.describe()
    assert str(GUID_A) in result.describe()


def mapping_props(guid: int, *, action: str = "add") -> dict[str, str]:
    """zbackupd's own device-mapper mapping over a disk's pool partition: a zfs_member of a
    known pool, without a serial (as udev reports dm-0 in the VM)."""
    return {
        "ACTION": action,
        "DEVPATH": "/devices/virtual/block/dm-0",
        "DEVNAME": "/dev/dm-0",
        "DEVTYPE": "disk",
        "DM_NAME": "zbackupd-offsite-a",
        "DM_UUID": "",
        "ID_FS_TYPE": "zfs_member",
        "ID_FS_UUID": str(guid),
        "ID_FS_LABEL": "xa",
        "DEVLINKS": f"/dev/mapper/zbackupd-offsite-a /dev/disk/by-id/dm-name-zbackupd-offsite-a "
        f"/dev/disk/by-uuid/{guid}",
    }


@pytest.mark.parametrize("action", ["add", "change", "remove"])
def test_a_device_mapper_device_is_never_a_disk(action: str) -> None:
    """Our own mapping appears and goes with every import: not a plug, a pull, or a disk
    with the wrong serial."""
    ev = event(mapping_props(GUID_A, action=action))
    assert ev.dm_name == "zbackupd-offsite-a"
    assert isinstance(match_disk(ev, KNOWN), NotOurs)
    tracker = DiskTracker(KNOWN)
    seen = tracker.observe(ev)
    assert seen is None or isinstance(seen, NotOurs)


def test_serial_mismatch_reports_the_serial_it_saw() -> None:
    result = match_disk(event(usb_partition_props("BRIDGE-LIES", GUID_A)), KNOWN)
    assert isinstance(result, SerialMismatch)
    assert result.seen_serial == "BRIDGE-LIES"
    assert "BRIDGE-LIES" in result.describe()
    assert "OFFSITE-A" in result.describe()


def test_nothing_matches_without_configured_disks() -> None:
    assert isinstance(match_disk(event(usb_partition_props("OFFSITE-A", GUID_A)), ()), NotOurs)


# --- DiskTracker -------------------------------------------------------------------------


def test_coldplug_then_hotplug_of_the_same_device_is_reported_once() -> None:
    tracker = DiskTracker(KNOWN)
    first = tracker.observe(
        event(usb_partition_props("OFFSITE-A", GUID_A, action=None), coldplug=True)
    )
    second = tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A)))
    assert isinstance(first, Candidate)
    assert first.identity == DISK_A
    assert second is None


def test_not_ours_is_not_reported() -> None:
    tracker = DiskTracker(KNOWN)
    assert tracker.observe(event(usb_disk_props("OFFSITE-A"))) is None
    assert tracker.observe(event(usb_partition_props("STRANGER", GUID_STRANGER))) is None
    assert tracker.reported_paths() == frozenset()


def test_impostor_is_reported_once() -> None:
    tracker = DiskTracker(KNOWN)
    props = usb_partition_props("OFFSITE-A", GUID_STRANGER)
    assert isinstance(tracker.observe(event(props)), Impostor)
    assert tracker.observe(event(props)) is None


def test_change_events_during_a_session_are_ignored() -> None:
    tracker = DiskTracker(KNOWN)
    assert isinstance(tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A))), Candidate)
    tracker.begin_session(DISK_A)
    assert tracker.in_session(DISK_A)
    # zpool import/export make udev re-probe: change events, even with a different picture
    assert tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A, action="change"))) is None
    assert tracker.observe(event(usb_partition_props("OFFSITE-A", None, action="change"))) is None
    odd = usb_partition_props("OFFSITE-A", "unreadable", action="change")
    assert tracker.observe(event(odd)) is None
    # the same odd picture outside a session would be news (see the next test)
    tracker.end_session(DISK_A)
    assert isinstance(tracker.observe(event(odd)), Impostor)


def test_change_after_the_session_is_reported_only_if_the_verdict_changes() -> None:
    tracker = DiskTracker(KNOWN)
    tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A)))
    tracker.begin_session(DISK_A)
    tracker.end_session(DISK_A)
    assert not tracker.in_session(DISK_A)
    assert tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A, action="change"))) is None
    # the disk was re-initialised with another pool while plugged in: that is news
    changed = tracker.observe(
        event(usb_partition_props("OFFSITE-A", GUID_STRANGER, action="change"))
    )
    assert isinstance(changed, Impostor)


def test_change_revealing_a_pool_on_an_unreported_device_is_a_first_appearance() -> None:
    tracker = DiskTracker(KNOWN)
    assert tracker.observe(event(usb_partition_props("OFFSITE-A", None))) is None
    result = tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A, action="change")))
    assert isinstance(result, Candidate)


def test_remove_then_readd_is_a_new_add_even_during_a_session() -> None:
    tracker = DiskTracker(KNOWN)
    tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A, sd="sdb", host=2)))
    tracker.begin_session(DISK_A)
    removed = tracker.observe(
        event(usb_partition_props("OFFSITE-A", GUID_A, sd="sdb", host=2, action="remove"))
    )
    assert isinstance(removed, Removed)
    assert removed.identity == DISK_A
    # pulled mid-transfer, plugged back: new host number and sdX; the session must hear it
    back = tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A, sd="sdc", host=3)))
    assert isinstance(back, Candidate)
    assert back.event.device_node == "/dev/sdc1"
    assert back.event.by_id_link == removed.event.by_id_link


def test_readd_under_the_same_device_path_after_remove_is_reported_again() -> None:
    tracker = DiskTracker(KNOWN)
    props = usb_partition_props("OFFSITE-A", GUID_A)
    assert isinstance(tracker.observe(event(props)), Candidate)
    assert isinstance(tracker.observe(event({**props, "ACTION": "remove"})), Removed)
    assert isinstance(tracker.observe(event(props)), Candidate)


def test_remove_is_known_by_device_path_even_without_properties() -> None:
    tracker = DiskTracker(KNOWN)
    props = usb_partition_props("OFFSITE-A", GUID_A)
    tracker.observe(event(props))
    bare = {"ACTION": "remove", "DEVPATH": props["DEVPATH"], "SUBSYSTEM": "block"}
    result = tracker.observe(event(bare))
    assert isinstance(result, Removed)
    assert result.identity == DISK_A


def test_remove_of_unreported_devices_and_other_actions_are_ignored() -> None:
    tracker = DiskTracker(KNOWN)
    assert tracker.observe(event(usb_disk_props("OFFSITE-A", action="remove"))) is None
    assert tracker.observe(event(usb_partition_props("OFFSITE-A", GUID_A, action="bind"))) is None
    assert tracker.reported_paths() == frozenset()


def test_resync_reports_what_disappeared_and_what_appeared() -> None:
    tracker = DiskTracker(KNOWN)
    a_props = usb_partition_props("OFFSITE-A", GUID_A, sd="sda")
    tracker.observe(event(a_props))
    b_present = event(
        usb_partition_props(
            "OFFSITE-B", GUID_B, sd="sdb", host=3, port="2-2", pool="xb", action=None
        ),
        coldplug=True,
    )
    results = tracker.resync([b_present, event(usb_disk_props("OFFSITE-B", sd="sdb"))])
    assert [(type(r), r.identity) for r in results if not isinstance(r, NotOurs)] == [
        (Removed, DISK_A),
        (Candidate, DISK_B),
    ]
    assert tracker.reported_paths() == frozenset({b_present.device_path})
    # and a resync that changes nothing reports nothing
    assert tracker.resync([b_present]) == []


# --- UdevWatcher with a pipe-backed fake monitor -------------------------------------------


class PipeMonitor:
    """A monitor whose fd is a real pipe: one byte per queued event wakes the loop."""

    def __init__(self, calls: list[str]) -> None:
        self._calls = calls
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._queue: deque[Mapping[str, str] | OSError] = deque()

    def push(self, item: Mapping[str, str] | OSError) -> None:
        self._queue.append(item)
        os.write(self._write_fd, b"!")

    def filter_by(self, subsystem: str) -> None:
        self._calls.append(f"filter_by:{subsystem}")

    def start(self) -> None:
        self._calls.append("start")

    def fileno(self) -> int:
        return self._read_fd

    def poll(self, timeout: float) -> Mapping[str, str] | None:
        assert timeout == 0, "the watcher must never block the loop"
        try:
            os.read(self._read_fd, 1)
        except BlockingIOError:
            return None
        item = self._queue.popleft()
        if isinstance(item, OSError):
            raise item
        return item

    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class FakeBackend:
    """Hands out one pipe monitor; ``present`` is what enumeration returns right now."""

    def __init__(self, present: Iterable[Mapping[str, str]] = ()) -> None:
        self.calls: list[str] = []
        self.present = list(present)
        self.monitor = PipeMonitor(self.calls)
        self.on_enumerate: list[Mapping[str, str]] = []  # arrives on the monitor meanwhile

    def new_monitor(self) -> PipeMonitor:
        self.calls.append("new_monitor")
        return self.monitor

    def enumerate(self, subsystem: str) -> list[Mapping[str, str]]:
        self.calls.append(f"enumerate:{subsystem}")
        for props in self.on_enumerate:
            self.monitor.push(props)
        self.on_enumerate = []
        return [{k: v for k, v in p.items() if k != "ACTION"} for p in self.present]


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend()
    yield fake
    fake.monitor.close()


async def next_match(queue: asyncio.Queue[Match]) -> Match:
    return await asyncio.wait_for(queue.get(), timeout=5)


async def settle(monitor: PipeMonitor) -> None:
    """Let the loop run until the watcher drained everything queued on the pipe."""
    for _ in range(200):
        if monitor.pending() == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("watcher did not drain the monitor")


async def test_watcher_starts_the_monitor_before_enumerating_and_dedupes_coldplug(
    backend: FakeBackend,
) -> None:
    a_props = usb_partition_props("OFFSITE-A", GUID_A)
    backend.present = [
        usb_disk_props("OFFSITE-A"),
        a_props,
        usb_partition_props("OFFSITE-A", None, part=9),
    ]
    # the same disk's add event lands on the monitor while enumeration runs
    backend.on_enumerate = [a_props]
    queue: asyncio.Queue[Match] = asyncio.Queue()
    watcher = UdevWatcher(KNOWN, queue.put_nowait, backend=backend)
    watcher.start()
    try:
        assert backend.calls == ["new_monitor", "filter_by:block", "start", "enumerate:block"]
        first = await next_match(queue)
        assert isinstance(first, Candidate)
        assert first.identity == DISK_A
        assert first.event.coldplug
        await settle(backend.monitor)
        assert queue.empty()
    finally:
        watcher.stop()
    assert not watcher.running


async def test_watcher_reports_hotplug_and_ignores_own_change_events(
    backend: FakeBackend,
) -> None:
    queue: asyncio.Queue[Match] = asyncio.Queue()
    watcher = UdevWatcher(KNOWN, queue.put_nowait, backend=backend)
    watcher.start()
    try:
        assert queue.empty()
        backend.monitor.push(usb_disk_props("OFFSITE-B", sd="sdb"))
        backend.monitor.push(usb_partition_props("OFFSITE-B", GUID_B, sd="sdb", pool="xb"))
        plugged = await next_match(queue)
        assert isinstance(plugged, Candidate)
        assert plugged.identity == DISK_B
        assert not plugged.event.coldplug

        watcher.begin_session(DISK_B)
        backend.monitor.push(
            usb_partition_props("OFFSITE-B", GUID_B, sd="sdb", pool="xb", action="change")
        )
        backend.monitor.push(
            usb_partition_props("OFFSITE-A", GUID_STRANGER, sd="sdc", host=4, port="2-3")
        )
        impostor = await next_match(queue)
        assert isinstance(impostor, Impostor)  # the change before it produced nothing
        watcher.end_session(DISK_B)

        backend.monitor.push(
            usb_partition_props("OFFSITE-B", GUID_B, sd="sdb", pool="xb", action="remove")
        )
        removed = await next_match(queue)
        assert isinstance(removed, Removed)
        assert removed.identity == DISK_B
        assert queue.empty()
    finally:
        watcher.stop()


async def test_watcher_reenumerates_after_netlink_overflow(backend: FakeBackend) -> None:
    a_props = usb_partition_props("OFFSITE-A", GUID_A)
    backend.present = [a_props]
    queue: asyncio.Queue[Match] = asyncio.Queue()
    watcher = UdevWatcher(KNOWN, queue.put_nowait, backend=backend)
    watcher.start()
    try:
        assert isinstance(await next_match(queue), Candidate)
        # while the buffer overflowed, A was pulled and B plugged in: both events lost
        backend.present = [
            usb_partition_props("OFFSITE-B", GUID_B, sd="sdb", host=3, port="2-2", pool="xb")
        ]
        backend.monitor.push(OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS)))
        removed = await next_match(queue)
        plugged = await next_match(queue)
        assert isinstance(removed, Removed)
        assert removed.identity == DISK_A
        assert isinstance(plugged, Candidate)
        assert plugged.identity == DISK_B
        assert backend.calls.count("enumerate:block") == 2
        assert watcher.running
        # and watching goes on afterwards
        backend.monitor.push(usb_partition_props("OFFSITE-A", GUID_A, sd="sdc", host=5))
        assert isinstance(await next_match(queue), Candidate)
    finally:
        watcher.stop()


async def test_watcher_stops_and_reports_other_receive_errors(backend: FakeBackend) -> None:
    queue: asyncio.Queue[Match] = asyncio.Queue()
    errors: list[UdevMonitorFailed] = []
    failed = asyncio.Event()

    def on_error(error: UdevMonitorFailed) -> None:
        errors.append(error)
        failed.set()

    watcher = UdevWatcher(KNOWN, queue.put_nowait, backend=backend, on_error=on_error)
    watcher.start()
    backend.monitor.push(OSError(errno.EBADF, os.strerror(errno.EBADF)))
    await asyncio.wait_for(failed.wait(), timeout=5)
    assert not watcher.running
    assert errors[0].errno == errno.EBADF
    assert errors[0].transient
    # no longer watched: a later event is not picked up
    backend.monitor.push(usb_partition_props("OFFSITE-A", GUID_A))
    await asyncio.sleep(0.05)
    assert queue.empty()
    assert backend.monitor.pending() == 1


async def test_watcher_skips_malformed_events(backend: FakeBackend) -> None:
    queue: asyncio.Queue[Match] = asyncio.Queue()
    watcher = UdevWatcher(KNOWN, queue.put_nowait, backend=backend)
    watcher.start()
    try:
        backend.monitor.push({"ACTION": "add", "SUBSYSTEM": "block"})
        backend.monitor.push(usb_partition_props("OFFSITE-A", GUID_A))
        assert isinstance(await next_match(queue), Candidate)
    finally:
        watcher.stop()


async def test_restarted_watcher_reports_what_changed_while_it_was_stopped(
    backend: FakeBackend,
) -> None:
    backend.present = [usb_partition_props("OFFSITE-A", GUID_A)]
    queue: asyncio.Queue[Match] = asyncio.Queue()
    watcher = UdevWatcher(KNOWN, queue.put_nowait, backend=backend)
    watcher.start()
    assert isinstance(await next_match(queue), Candidate)
    watcher.stop()
    backend.present = []
    watcher.start()
    try:
        removed = await next_match(queue)
        assert isinstance(removed, Removed)
        assert removed.identity == DISK_A
    finally:
        watcher.stop()
