"""``zbackupd init-disk``: turn a new external disk into a backup disk.

Creates the encrypted pool (key from memory, on stdin), the target root dataset, exports
the pool and prints the ``[[disks]]`` block for the configuration. Refuses a disk that
holds partitions or a file-system signature unless ``--force``, and says what it found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from zbackupd.errors import PermanentError
from zbackupd.keys.secret import wipe
from zbackupd.zfs import names
from zbackupd.zfs.facade import Zfs

BY_ID = "/dev/disk/by-id/"


class DiskNotBlank(PermanentError):
    def __init__(self, device: str, findings: tuple[str, ...]) -> None:
        self.device = device
        self.findings = findings
        super().__init__(
            f"{device} is not blank ({'; '.join(findings)}); "
            "re-run with --force to destroy what is on it"
        )


class UnsuitableDevice(PermanentError):
    """Not a whole disk given by its /dev/disk/by-id/ name, or already configured."""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the kernel and udev say about the disk (gathered by the shell, judged purely)."""

    by_id: str
    kernel_name: str
    is_partition: bool
    serial: str | None
    partitions: tuple[str, ...]
    signature: str | None  # ID_FS_TYPE of the whole disk (e.g. zfs_member, ext4)
    partition_signatures: Mapping[str, str]


def check_blank(facts: DeviceFacts) -> tuple[str, ...]:
    """Everything on the disk that ``zpool create`` would destroy (empty: blank)."""
    found: list[str] = []
    if facts.signature:
        found.append(f"whole-disk signature {facts.signature}")
    for part in facts.partitions:
        kind = facts.partition_signatures.get(part)
        found.append(f"partition {part}" + (f" ({kind})" if kind else ""))
    return tuple(found)


def check_device(facts: DeviceFacts, configured_serials: Mapping[str, str]) -> None:
    if not facts.by_id.startswith(BY_ID):
        raise UnsuitableDevice(f"{facts.by_id}: give the disk by its {BY_ID} name")
    if facts.is_partition:
        raise UnsuitableDevice(f"{facts.by_id} is a partition; give the whole disk")
    if not facts.serial:
        raise UnsuitableDevice(f"{facts.by_id} reports no serial (ID_SERIAL_SHORT)")
    if facts.serial in configured_serials:
        raise UnsuitableDevice(
            f"serial {facts.serial} is already configured as disk "
            f"{configured_serials[facts.serial]!r}"
        )


def device_facts(
    by_id: str, udev_properties: Callable[[str], Mapping[str, str]], sysfs: Path = Path("/sys")
) -> DeviceFacts:
    """Gather the facts from sysfs and udev (``udev_properties(kernel_name)``)."""
    kernel = Path(os.path.realpath(by_id)).name
    block = sysfs / "class" / "block" / kernel
    if not block.exists():
        raise UnsuitableDevice(f"{by_id}: no such block device")
    partitions = tuple(
        sorted(child.name for child in block.resolve().iterdir() if (child / "partition").exists())
    )
    props = udev_properties(kernel)
    partition_signatures = {
        part: kind for part in partitions if (kind := udev_properties(part).get("ID_FS_TYPE"))
    }
    return DeviceFacts(
        by_id=by_id,
        kernel_name=kernel,
        is_partition=(block / "partition").exists(),
        serial=props.get("ID_SERIAL_SHORT"),
        partitions=partitions,
        signature=props.get("ID_FS_TYPE"),
        partition_signatures=partition_signatures,
    )


def pyudev_properties(kernel_name: str) -> Mapping[str, str]:
    import pyudev  # noqa: PLC0415 -- only init-disk needs udev in the CLI process

    device = pyudev.Devices.from_name(pyudev.Context(), "block", kernel_name)
    return {str(key): str(device.properties[key]) for key in device.properties}


def config_snippet(label: str, serial: str, pool_guid: int, pool_name: str) -> str:
    return (
        "[[disks]]\n"
        f'label = "{label}"\n'
        f'serial = "{serial}"\n'
        f'pool_guid = "{pool_guid}"\n'
        f'pool_name = "{pool_name}"\n'
    )


async def init_disk(
    zfs: Zfs,
    facts: DeviceFacts,
    *,
    label: str,
    pool_name: str,
    pool_key: bytearray,
    force: bool,
) -> int:
    """Create, prepare and export the pool; returns its GUID. Zeroes ``pool_key``."""
    names.validate_disk_label(label)
    findings = check_blank(facts)
    if findings and not force:
        wipe(pool_key)
        raise DiskNotBlank(facts.by_id, findings)
    try:
        await zfs.create_pool(pool_name, facts.by_id, pool_key, force=bool(findings))
    finally:
        wipe(pool_key)
    try:
        await zfs.create_placeholder(f"{pool_name}/backup")
        guid = int((await zfs.pool_properties(pool_name, ["guid"]))["guid"])
        await zfs.unload_key(pool_name)
    finally:
        await zfs.export_pool(pool_name)
    return guid
