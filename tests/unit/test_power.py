"""Power-off against a fake sysfs tree built from real directories, symlinks and files.

The layout copies the kernel's: ``/sys/class/block/<name>`` links into
``/sys/devices/…/block/<disk>[/<partition>]``, and ``<disk>/device`` links to the SCSI
device, whose ancestors are the USB interface and the ``usb_device`` (``devnum``,
``busnum``, ``remove``). The VM suite proves the same on a real kernel.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zbackupd.disk.power import (
    DiskGone,
    DiskPower,
    DiskStillInUse,
    PoweredOff,
    PowerOffFailed,
    PowerOffMethod,
    PowerOffUnsupported,
    kernel_name,
)


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent))


@dataclass
class FakeMachine:
    sys: Path
    dev: Path

    def usb_device(self, port: str, *, device_class: str = "00") -> Path:
        root_hub = self.sys / "devices/pci0000:00/0000:00:05.0/usb2"
        for attr, value in (("devnum", "1"), ("busnum", "2"), ("bDeviceClass", "09")):
            write(root_hub / attr, value + "\n")
        write(root_hub / "remove")
        usb = root_hub / port
        for attr, value in (("devnum", "3"), ("busnum", "2"), ("bDeviceClass", device_class)):
            write(usb / attr, value + "\n")
        write(usb / "remove")
        write(usb / "idProduct", "0001\n")
        return usb

    def usb_disk(
        self, usb: Path, disk: str, *, host: int, lun: int = 0, partitions: tuple[int, ...] = (1, 9)
    ) -> Path:
        interface = usb / f"{usb.name}:1.0"
        write(interface / "bInterfaceClass", "08\n")
        scsi = interface / f"host{host}/target{host}:0:0/{host}:0:0:{lun}"
        return self._disk(scsi, disk, partitions)

    def sata_disk(self, disk: str, *, partitions: tuple[int, ...] = (1, 9)) -> Path:
        scsi = self.sys / "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0"
        return self._disk(scsi, disk, partitions)

    def virtio_disk(self, disk: str) -> Path:
        virtio = self.sys / "devices/pci0000:00/0000:00:06.0/virtio3"
        write(virtio / "features", "0\n")
        return self._disk(virtio, disk, (1,))

    def _disk(self, parent_device: Path, disk: str, partitions: tuple[int, ...]) -> Path:
        write(parent_device / "delete")  # SCSI devices have one; only used for non-USB
        disk_dir = parent_device / "block" / disk
        write(disk_dir / "uevent", f"MAJOR=8\nMINOR=0\nDEVNAME={disk}\nDEVTYPE=disk\n")
        (disk_dir / "holders").mkdir()
        link(disk_dir / "device", parent_device)
        link(self.sys / "class/block" / disk, disk_dir)
        link(self.sys / "block" / disk, disk_dir)
        write(self.dev / disk)
        for number in partitions:
            part = f"{disk}{number}"
            part_dir = disk_dir / part
            write(part_dir / "partition", f"{number}\n")
            write(
                part_dir / "uevent", f"MAJOR=8\nMINOR={number}\nDEVNAME={part}\nDEVTYPE=partition\n"
            )
            (part_dir / "holders").mkdir()
            link(self.sys / "class/block" / part, part_dir)
            write(self.dev / part)
        return disk_dir


@dataclass
class RecordingOpener:
    """Opens the fake device files for real; ``busy`` names answer EBUSY like a held disk."""

    busy: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    opened: list[tuple[str, int]] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def __call__(self, path: str, flags: int) -> int:
        self.threads.add(threading.get_ident())
        name = Path(path).name
        if name in self.busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        if name in self.gone:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), path)
        self.opened.append((name, flags))
        # O_EXCL without O_CREAT only means something for block devices; drop it for files
        return os.open(path, flags & ~os.O_EXCL)


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(sys=tmp_path / "sys", dev=tmp_path / "dev")


def power(machine: FakeMachine, opener: RecordingOpener) -> DiskPower:
    return DiskPower(sysfs_root=machine.sys, dev_root=machine.dev, opener=opener)


def ones(root: Path) -> list[Path]:
    """Every file under ``root`` that holds exactly ``1``: what was written."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.read_text() == "1")


def test_usb_disk_is_checked_then_its_usb_device_removed(machine: FakeMachine) -> None:
    usb = machine.usb_device("2-1")
    machine.usb_disk(usb, "sda", host=2)
    opener = RecordingOpener()

    result = power(machine, opener).power_off_blocking("sda1")

    assert result == PoweredOff(
        "sda", ("sda1", "sda9", "sda"), PowerOffMethod.USB_REMOVE, usb / "remove"
    )
    assert ones(machine.sys) == [usb / "remove"]  # not the root hub, not the SCSI delete
    assert [name for name, _ in opener.opened] == ["sda1", "sda9", "sda"]
    for _, flags in opener.opened:
        assert flags & os.O_EXCL
        assert flags & os.O_ACCMODE == os.O_RDONLY


def test_device_may_be_named_by_dev_path_or_by_id_link(machine: FakeMachine) -> None:
    usb = machine.usb_device("2-1")
    machine.usb_disk(usb, "sdc", host=4)
    by_id = machine.dev / "disk/by-id/usb-QEMU_QEMU_HARDDISK_OFFSITE-A-0:0-part1"
    link(by_id, machine.dev / "sdc1")
    assert kernel_name(str(by_id)) == "sdc1"
    assert kernel_name(str(machine.dev / "sdc")) == "sdc"
    assert kernel_name("sdc9") == "sdc9"

    result = power(machine, RecordingOpener()).power_off_blocking(str(by_id))
    assert result.whole_disk == "sdc"
    assert ones(machine.sys) == [usb / "remove"]


def test_sata_disk_is_deleted_from_the_scsi_layer(machine: FakeMachine) -> None:
    disk_dir = machine.sata_disk("sdb")
    scsi_delete = disk_dir / "device" / "delete"

    result = power(machine, RecordingOpener()).power_off_blocking("sdb")

    assert result.method is PowerOffMethod.SCSI_DELETE
    assert result.checked == ("sdb1", "sdb9", "sdb")
    assert ones(machine.sys) == [scsi_delete.resolve()]
    assert ones(machine.sys)[0] == machine.sys.resolve() / (
        "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/delete"
    )


def test_busy_partition_refuses_power_off(machine: FakeMachine) -> None:
    usb = machine.usb_device("2-1")
    disk_dir = machine.usb_disk(usb, "sda", host=2)
    (disk_dir / "sda1" / "holders" / "dm-0").mkdir()
    opener = RecordingOpener(busy={"sda1"})

    with pytest.raises(DiskStillInUse) as caught:
        power(machine, opener).power_off_blocking("sda")

    assert caught.value.device == "sda1"
    assert caught.value.whole_disk == "sda"
    assert caught.value.holders == ("dm-0",)
    assert not caught.value.transient
    assert ones(machine.sys) == []


def test_busy_whole_disk_refuses_power_off(machine: FakeMachine) -> None:
    machine.sata_disk("sdb")
    with pytest.raises(DiskStillInUse) as caught:
        power(machine, RecordingOpener(busy={"sdb"})).power_off_blocking("sdb1")
    assert caught.value.device == "sdb"
    assert ones(machine.sys) == []


def test_every_disk_behind_the_usb_device_is_checked(machine: FakeMachine) -> None:
    dock = machine.usb_device("2-2")
    machine.usb_disk(dock, "sdc", host=5, lun=0)
    machine.usb_disk(dock, "sdd", host=5, lun=1, partitions=(1,))

    with pytest.raises(DiskStillInUse) as caught:
        power(machine, RecordingOpener(busy={"sdd1"})).power_off_blocking("sdc")
    assert caught.value.device == "sdd1"
    assert ones(machine.sys) == []

    result = power(machine, RecordingOpener()).power_off_blocking("sdc")
    assert result.checked == ("sdc1", "sdc9", "sdc", "sdd1", "sdd")
    assert ones(machine.sys) == [dock / "remove"]


def test_a_usb_hub_is_never_removed(machine: FakeMachine) -> None:
    hub = machine.usb_device("2-3", device_class="09")
    machine.usb_disk(hub, "sde", host=6)
    with pytest.raises(PowerOffUnsupported) as caught:
        power(machine, RecordingOpener()).power_off_blocking("sde")
    assert "hub" in caught.value.reason
    assert ones(machine.sys) == []


def test_disk_without_usb_parent_or_scsi_delete_is_unsupported(machine: FakeMachine) -> None:
    disk_dir = machine.virtio_disk("vda")
    (disk_dir / "device" / "delete").unlink()
    with pytest.raises(PowerOffUnsupported):
        power(machine, RecordingOpener()).power_off_blocking("vda")
    assert ones(machine.sys) == []


def test_vanished_disk_is_reported_gone(machine: FakeMachine) -> None:
    machine.sata_disk("sdb")
    with pytest.raises(DiskGone) as caught:
        power(machine, RecordingOpener()).power_off_blocking("sdz1")
    assert caught.value.device == "sdz1"
    with pytest.raises(DiskGone):
        power(machine, RecordingOpener(gone={"sdb1"})).power_off_blocking("sdb")
    assert ones(machine.sys) == []


def test_failed_sysfs_write_is_a_typed_error(machine: FakeMachine) -> None:
    disk_dir = machine.sata_disk("sdb")
    scsi_delete = (disk_dir / "device" / "delete").resolve()
    scsi_delete.unlink()
    scsi_delete.mkdir()  # writing fails with EISDIR, also for root
    with pytest.raises(PowerOffFailed) as caught:
        power(machine, RecordingOpener()).power_off_blocking("sdb")
    assert caught.value.path == str(disk_dir / "device" / "delete")
    assert caught.value.errno == errno.EISDIR
    assert caught.value.whole_disk == "sdb"


async def test_async_power_off_runs_off_the_loop_thread(machine: FakeMachine) -> None:
    usb = machine.usb_device("2-1")
    machine.usb_disk(usb, "sda", host=2)
    opener = RecordingOpener()

    result = await power(machine, opener).power_off("sda")

    assert result.method is PowerOffMethod.USB_REMOVE
    assert opener.threads
    assert threading.get_ident() not in opener.threads
