"""init-disk's pure decisions: what counts as blank, which devices are refused, the snippet."""

from __future__ import annotations

from pathlib import Path

import pytest

from zbackupd.config import parse_config
from zbackupd.disk.initdisk import (
    DeviceFacts,
    UnsuitableDevice,
    check_blank,
    check_device,
    config_snippet,
    device_facts,
)
from zbackupd.zfs.argv import InvalidArgument, zpool_create

BY_ID = "/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_ZB1-0:0"
REPO = Path(__file__).resolve().parents[2]


def facts(**changes: object) -> DeviceFacts:
    base: dict[str, object] = {
        "by_id": BY_ID, "kernel_name": "sda", "is_partition": False, "serial": "ZB1",
        "partitions": (), "signature": None, "partition_signatures": {},
    }
    base.update(changes)
    return DeviceFacts(**base)  # type: ignore[arg-type]


def test_blank_disk_has_no_findings() -> None:
    assert check_blank(facts()) == ()


def test_partitions_and_signatures_are_named() -> None:
    found = check_blank(facts(signature="zfs_member", partitions=("sda1", "sda9"),
                              partition_signatures={"sda1": "ext4"}))
    assert found == ("whole-disk signature zfs_member", "partition sda1 (ext4)", "partition sda9")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"by_id": "/dev/sda"}, "by its /dev/disk/by-id/ name"),
        ({"is_partition": True}, "is a partition"),
        ({"serial": None}, "reports no serial"),
        ({"serial": "TAKEN"}, "already configured as disk 'offsite-a'"),
    ],
)
def test_unsuitable_devices_are_refused(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(UnsuitableDevice, match=reason):
        check_device(facts(**changes), {"TAKEN": "offsite-a"})


def test_snippet_is_a_valid_disk_entry() -> None:
    base = (REPO / "docs/examples/minimal.toml").read_text().split("[[disks]]")[0]
    snippet = config_snippet("offsite-c", "ZB1", 2**64 - 5, "zbk-offsite-c")
    config = parse_config(base + snippet, source="snippet")
    disk = config.disk_by_label("offsite-c")
    assert disk is not None
    assert (disk.serial, disk.pool_guid, disk.pool_name) == ("ZB1", 2**64 - 5, "zbk-offsite-c")


def test_pool_is_created_encrypted_from_stdin_and_never_mounted() -> None:
    argv = zpool_create("zbk-a", BY_ID)
    assert argv[:2] == ("zpool", "create")
    assert "-f" not in argv
    for option in ("encryption=on", "keyformat=raw", "keylocation=prompt", "mountpoint=none",
                   "canmount=off", "compression=zstd"):
        assert option in argv
    assert argv[-2:] == ("zbk-a", BY_ID)
    assert "-f" in zpool_create("zbk-a", BY_ID, force=True)
    with pytest.raises(InvalidArgument):
        zpool_create("zbk-a", "/dev/sda")


def test_device_facts_from_a_sysfs_tree(tmp_path: Path) -> None:
    disk = tmp_path / "devices" / "sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "sda1" / "partition").write_text("1")
    block = tmp_path / "class" / "block"
    block.mkdir(parents=True)
    (block / "sda").symlink_to(disk)
    link = tmp_path / "by-id-link"
    link.symlink_to(tmp_path / "sda")  # realpath's name is what counts
    props = {"sda": {"ID_SERIAL_SHORT": "ZB1"}, "sda1": {"ID_FS_TYPE": "ext4"}}
    found = device_facts(str(link), lambda name: props.get(name, {}), sysfs=tmp_path)
    assert found.kernel_name == "sda"
    assert found.serial == "ZB1"
    assert found.partitions == ("sda1",)
    assert found.partition_signatures == {"sda1": "ext4"}
    assert not found.is_partition
