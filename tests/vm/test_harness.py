"""Smoke tests of the harness itself, on real OpenZFS in the VM.

Each one proves a piece of plumbing the daemon's VM tests will stand on: the OpenZFS
version, USB hotplug with a chosen serial, an encrypted pool keyed from stdin, a raw send
from the netns server over SSH, export and sysfs power-off, host-side unplug/replug, and
zbackupd installed from this checkout.
"""

from __future__ import annotations

import os
import re

import pytest

import zbackupd
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import UsbDisk, Vm
from tests.vm.topology import BackupServer

pytestmark = pytest.mark.vm

POOL = "xpool"


def _create_encrypted_pool(vm: Vm, disk: UsbDisk, key: bytes) -> None:
    """``zpool create`` on the USB disk with a raw key read from stdin (never a file)."""
    assert len(key) == 32
    vm.run(
        f"zpool create -f -o ashift=12 -O encryption=on -O keyformat=raw "
        f"-O keylocation=prompt -O mountpoint=none -O canmount=off {POOL} {disk.by_id}",
        stdin=key,
    )


def _prop(vm: Vm, dataset: str, prop: str) -> str:
    return vm.run(f"zfs get -H -p -o value {prop} {dataset}").stdout.strip()


def test_guest_runs_openzfs_2_3_or_newer(vm: Vm) -> None:
    output = vm.run("zfs version").stdout
    kmod = re.search(r"^zfs-kmod-(\d+)\.(\d+)\.(\d+)", output, re.MULTILINE)
    userland = re.search(r"^zfs-(\d+)\.(\d+)\.(\d+)", output, re.MULTILINE)
    assert kmod is not None, output
    assert userland is not None, output
    assert (int(kmod[1]), int(kmod[2])) >= (2, 3), output
    assert (int(userland[1]), int(userland[2])) >= (2, 3), output


def test_plugged_usb_disk_carries_the_chosen_serial_in_udev(
    vm: Vm, usb_disk: UsbDiskFactory
) -> None:
    disk = usb_disk(serial="SMOKE0001", size=256 << 20)
    properties = dict(
        line.split("=", 1)
        for line in vm.run(f"udevadm info -q property -n {disk.by_id}").stdout.splitlines()
        if "=" in line
    )
    assert properties["ID_SERIAL_SHORT"] == "SMOKE0001"
    assert properties["ID_BUS"] == "usb"
    size = vm.run(f"blockdev --getsize64 {disk.by_id}").stdout.strip()
    assert int(size) == 256 << 20


def test_encrypted_pool_is_created_and_unlocked_with_the_key_on_stdin(
    vm: Vm, usb_disk: UsbDiskFactory
) -> None:
    disk = usb_disk(size=512 << 20)
    key = os.urandom(32)
    _create_encrypted_pool(vm, disk, key)
    assert _prop(vm, POOL, "encryption") == "aes-256-gcm"
    assert _prop(vm, POOL, "keylocation") == "prompt"
    assert _prop(vm, POOL, "keystatus") == "available"
    pool_guid = vm.run(f"zpool get -H -p -o value guid {POOL}").stdout.strip()

    vm.run(f"zfs unload-key {POOL} && zpool export {POOL}")
    vm.run(f"zpool import -d {disk.by_id}-part1 -N -o cachefile=none {pool_guid}")
    assert _prop(vm, POOL, "keystatus") == "unavailable"
    wrong = vm.run(f"zfs load-key -L prompt {POOL}", stdin=os.urandom(32), check=False)
    assert wrong.returncode != 0
    assert "Incorrect key provided" in wrong.stderr
    vm.run(f"zfs load-key -L prompt {POOL}", stdin=key)
    assert _prop(vm, POOL, "keystatus") == "available"


def test_raw_send_from_the_netns_server_lands_on_the_usb_pool(
    vm: Vm, server: BackupServer, usb_disk: UsbDiskFactory
) -> None:
    disk = usb_disk(size=512 << 20)
    _create_encrypted_pool(vm, disk, os.urandom(32))
    vm.run(f"zfs create -u {POOL}/backup && zfs unload-key {POOL}")
    # The disk's key is not needed for a raw receive: the server's key travels encrypted.
    vm.run(
        f"{server.ssh('zfs send -w tank/secure@s1')} | zfs receive -s -u {POOL}/backup/secure\n"
        f"{server.ssh('zfs send -w -i @s1 tank/secure@s2')} | zfs receive -s -u "
        f"{POOL}/backup/secure",
        timeout=300,
    )
    for snapshot in server.snapshots:
        source_guid = vm.run(
            server.ssh(f"zfs get -H -p -o value guid tank/secure@{snapshot}")
        ).stdout.strip()
        assert _prop(vm, f"{POOL}/backup/secure@{snapshot}", "guid") == source_guid
    assert _prop(vm, f"{POOL}/backup/secure", "encryptionroot") == f"{POOL}/backup/secure"
    assert _prop(vm, f"{POOL}/backup/secure", "keystatus") == "unavailable"
    # And it really came over the veth link from the namespace's sshd.
    peer = vm.run(server.ssh("'echo $SSH_CLIENT'")).stdout.split()[0]
    assert peer == "10.77.0.1"


def test_export_then_sysfs_power_off_makes_the_disk_vanish(
    vm: Vm, usb_disk: UsbDiskFactory
) -> None:
    disk = usb_disk(size=256 << 20)
    _create_encrypted_pool(vm, disk, os.urandom(32))
    vm.run(f"zfs unload-key {POOL} && zpool export {POOL}")
    assert POOL not in vm.run("zpool list -H -o name").stdout.split()
    usb_device = vm.run(
        f"dev=/sys$(udevadm info -q path -n {disk.by_id})\n"
        'while [ "$dev" != /sys ]; do\n'
        '  grep -qx DEVTYPE=usb_device "$dev/uevent" && break\n'
        '  dev=$(dirname "$dev")\n'
        "done\n"
        'test -e "$dev/remove" && echo "$dev"'
    ).stdout.strip()
    vm.run(f"dmesg --clear && echo 1 > {usb_device}/remove")
    vm.run(
        f"for i in $(seq 100); do [ -e {disk.by_id} ] || break; sleep 0.1; done\n"
        f"! test -e {disk.by_id}",
        timeout=60,
    )
    kernel_log = vm.run("dmesg").stdout
    assert "Synchronizing SCSI cache" in kernel_log
    assert "USB disconnect" in kernel_log
    assert "QEMU HARDDISK" not in vm.run("lsblk -ndo MODEL").stdout.replace("_", " ")


def test_unplug_and_replug_from_the_host_side(vm: Vm, usb_disk: UsbDiskFactory) -> None:
    disk = usb_disk(serial="REPLUG0001", size=256 << 20)
    _create_encrypted_pool(vm, disk, os.urandom(32))
    pool_guid = vm.run(f"zpool get -H -p -o value guid {POOL}").stdout.strip()
    vm.run(f"zfs unload-key {POOL} && zpool export {POOL}")
    vm.unplug_usb_disk(disk)  # waits until the guest has lost it
    assert vm.run(f"test -e {disk.by_id}", check=False).returncode != 0

    replugged = vm.plug_usb_disk(disk.serial, disk.size_bytes, image=disk.image)
    partition = f"{replugged.by_id}-part1"
    uuid = vm.run(f"udevadm info -q property -n {partition} | sed -n 's/^ID_FS_UUID=//p'")
    assert uuid.stdout.strip() == pool_guid
    vm.run(f"zpool import -d {partition} -N -o cachefile=none {pool_guid}")
    assert vm.run(f"zpool list -H -o health {POOL}").stdout.strip() == "ONLINE"


def test_zbackupd_installed_in_the_guest_answers_version(zbackupd_version: str) -> None:
    assert zbackupd.__version__ in zbackupd_version
