"""Power a disk off after export, the way ``udisksctl power-off`` does (design.md §5).

1. Resolve the disk in sysfs (``/sys/class/block/<name>``): whole disk and partitions.
2. Open every block device that is about to disappear ``O_RDONLY|O_EXCL``: ``EBUSY`` means
   something (an imported pool, a mount, device-mapper) still holds it — the export did not
   really happen, so refuse (:class:`DiskStillInUse`). Otherwise ``fsync`` (flushes the
   disk's write cache) and close.
3. USB: write ``1`` to ``remove`` of the parent ``usb_device`` (the kernel synchronises the
   SCSI cache and disconnects the port). SATA/SCSI: write ``1`` to ``/sys/block/sdX/device/delete``.

A USB device may carry several disks (a dual-bay dock): all of them disappear with it, so
all of them are checked. Blocking but short; call :meth:`DiskPower.power_off` from the loop,
which runs the work in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from zbackupd.errors import PermanentError

# os.open's signature: (path, flags) -> fd. Tests pass one that opens files in tmp_path.
Opener = Callable[[str, int], int]

CLAIM_FLAGS = os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC
USB_HUB_CLASS = "09"
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENXIO, errno.ENODEV})


class DiskGone(PermanentError):
    """The block device is not there (already pulled). Nothing to power off."""

    def __init__(self, device: str) -> None:
        self.device = device
        super().__init__(f"disk {device} is gone: nothing to power off")


class DiskStillInUse(PermanentError):
    """A device of the disk is held by someone (``EBUSY`` on ``O_EXCL``): not powered off.

    After ``zpool export`` nothing should hold it; this means the export did not really
    happen or something else (a mount, device-mapper, md) claims the disk.
    """

    def __init__(self, device: str, whole_disk: str, holders: tuple[str, ...]) -> None:
        self.device = device
        self.whole_disk = whole_disk
        self.holders = holders
        held_by = f" (holders: {', '.join(holders)})" if holders else ""
        super().__init__(
            f"refusing to power off {whole_disk}: {device} is still in use{held_by}"
        )


class PowerOffUnsupported(PermanentError):
    """Neither a USB parent to remove nor a SCSI ``delete`` file (NVMe, virtio, …)."""

    def __init__(self, whole_disk: str, reason: str) -> None:
        self.whole_disk = whole_disk
        self.reason = reason
        super().__init__(f"cannot power off {whole_disk}: {reason}")


class PowerOffFailed(PermanentError):
    """An open, fsync or sysfs write failed for a reason other than the ones above."""

    def __init__(self, whole_disk: str, path: str, operation: str, error: OSError) -> None:
        self.whole_disk = whole_disk
        self.path = path
        self.operation = operation
        self.errno = error.errno
        super().__init__(
            f"power-off of {whole_disk}: {operation} {path} failed: "
            f"{error.strerror or error} (errno {error.errno})"
        )


class PowerOffMethod(Enum):
    USB_REMOVE = "usb-remove"  # 1 > /sys/.../usbN/N-M/remove
    SCSI_DELETE = "scsi-delete"  # 1 > /sys/block/sdX/device/delete


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """One block device in sysfs: its kernel name, node under /dev, and sysfs directory."""

    name: str
    node: str  # relative to the dev root, from uevent DEVNAME (e.g. "sdb1")
    sysfs_dir: Path


@dataclass(frozen=True, slots=True)
class PoweredOff:
    """What was done, for the log: which devices were checked and which file got ``1``."""

    whole_disk: str
    checked: tuple[str, ...]  # kernel names opened O_EXCL, fsynced and closed
    method: PowerOffMethod
    written: Path


def kernel_name(device: str) -> str:
    """``sdb1`` from ``sdb1``, ``/dev/sdb1`` or a ``/dev/disk/by-id/…`` link to it."""
    if "/" not in device:
        return device
    return Path(os.path.realpath(device)).name


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def _devname(sysfs_dir: Path) -> str:
    """The node name udev/devtmpfs uses, from the kernel's ``uevent`` (``DEVNAME=sdb1``)."""
    uevent = _read_text(sysfs_dir / "uevent") or ""
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            return value
    return sysfs_dir.name.replace("!", "/")


def _is_partition(sysfs_dir: Path) -> bool:
    return (sysfs_dir / "partition").is_file()


def _block_device(sysfs_dir: Path) -> BlockDevice:
    return BlockDevice(sysfs_dir.name, _devname(sysfs_dir), sysfs_dir)


def _partition_number(sysfs_dir: Path) -> int:
    text = _read_text(sysfs_dir / "partition") or ""
    return int(text) if text.isdecimal() else 0


class DiskPower:
    """Safe power-off. ``sysfs_root``, ``dev_root`` and ``opener`` are the test seams."""

    def __init__(
        self,
        *,
        sysfs_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
        opener: Opener = os.open,
    ) -> None:
        self._sysfs = sysfs_root
        self._dev = dev_root
        self._open = opener

    async def power_off(self, device: str) -> PoweredOff:
        """:meth:`power_off_blocking` in a thread: sysfs and fsync must not stall the loop."""
        return await asyncio.to_thread(self.power_off_blocking, device)

    def power_off_blocking(self, device: str) -> PoweredOff:
        """Check nothing holds the disk, then detach it. ``device``: ``sdb``, ``/dev/sdb1``…"""
        whole = self.whole_disk(device)
        usb_device = self.usb_parent(whole)
        if usb_device is not None:
            if _read_text(usb_device / "bDeviceClass") == USB_HUB_CLASS:
                raise PowerOffUnsupported(
                    whole.name, f"its USB parent {usb_device.name} is a hub; not removing that"
                )
            doomed = list(self._disks_below(usb_device)) or [whole]
            method, target = PowerOffMethod.USB_REMOVE, usb_device / "remove"
        else:
            target = whole.sysfs_dir / "device" / "delete"
            if not target.exists():
                raise PowerOffUnsupported(whole.name, "not USB and no SCSI device/delete file")
            doomed, method = [whole], PowerOffMethod.SCSI_DELETE

        checked: list[str] = []
        for disk in doomed:
            for block in (*self.partitions(disk), disk):
                self._claim_and_flush(block, whole.name)
                checked.append(block.name)
        self._write_one(target, whole.name)
        return PoweredOff(whole.name, tuple(checked), method, target)

    def whole_disk(self, device: str) -> BlockDevice:
        """The whole-disk device for a disk or one of its partitions."""
        name = kernel_name(device)
        entry = self._sysfs / "class" / "block" / name
        if not entry.exists():
            raise DiskGone(name)
        real = entry.resolve()
        return _block_device(real.parent if _is_partition(real) else real)

    def partitions(self, disk: BlockDevice) -> list[BlockDevice]:
        children = [c for c in disk.sysfs_dir.iterdir() if c.is_dir() and _is_partition(c)]
        return [_block_device(c) for c in sorted(children, key=_partition_number)]

    def usb_parent(self, disk: BlockDevice) -> Path | None:
        """The nearest ancestor of the disk's device that is a ``usb_device`` with ``remove``."""
        device_link = disk.sysfs_dir / "device"
        if not device_link.exists():
            return None
        devices_root = (self._sysfs / "devices").resolve()
        start = device_link.resolve()
        for directory in (start, *start.parents):
            if directory == devices_root or devices_root not in directory.parents:
                return None
            if all((directory / attr).is_file() for attr in ("devnum", "busnum", "remove")):
                return directory
        return None

    def _disks_below(self, usb_device: Path) -> Iterator[BlockDevice]:
        """Every whole disk under the USB device (its ``…/block/<disk>`` dirs), no symlinks."""
        for parent, dirnames, _ in os.walk(usb_device, followlinks=False):
            dirnames.sort()
            if Path(parent).name == "block":
                for name in dirnames:
                    candidate = Path(parent) / name
                    if not _is_partition(candidate):
                        yield _block_device(candidate)
                dirnames.clear()

    def _holders(self, block: BlockDevice) -> tuple[str, ...]:
        try:
            return tuple(sorted(p.name for p in (block.sysfs_dir / "holders").iterdir()))
        except FileNotFoundError:
            return ()

    def _claim_and_flush(self, block: BlockDevice, whole: str) -> None:
        path = str(self._dev / block.node)
        try:
            fd = self._open(path, CLAIM_FLAGS)
        except OSError as error:
            if error.errno == errno.EBUSY:
                raise DiskStillInUse(block.name, whole, self._holders(block)) from error
            if error.errno in _GONE_ERRNOS:
                raise DiskGone(block.name) from error
            raise PowerOffFailed(whole, path, "exclusive open of", error) from error
        try:
            os.fsync(fd)
        except OSError as error:
            raise PowerOffFailed(whole, path, "fsync of", error) from error
        finally:
            os.close(fd)

    @staticmethod
    def _write_one(target: Path, whole: str) -> None:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"1")
            finally:
                os.close(fd)
        except OSError as error:
            raise PowerOffFailed(whole, str(target), "write 1 to", error) from error
