"""The user story, for real: plug the disk in, walk away, find it backed up and powered off.

The daemon runs under systemd in the guest, installed from this checkout; the backup
server is a real sshd (with zbackupd-gate as forced command) in a network namespace;
the disks are virtual USB disks hot-plugged through QMP with chosen serials.
"""

from __future__ import annotations

import json

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.topology import BackupServer

pytestmark = pytest.mark.vm





def test_keygen_line_forces_the_gate(installed: str) -> None:
    assert installed.startswith('restrict,command="')
    assert "zbackupd-gate --config" in installed
    assert " ssh-ed25519 " in installed


def test_plug_in_walk_away_then_incremental(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    usb = usb_disk(serial="ZBSTORY01", size=1 << 30)
    disk = story.init_disk(vm, usb, "story-a")
    vm.unplug_usb_disk(usb)
    story.start_daemon(vm)
    assert vm.run("systemctl is-active zbackupd").stdout.strip() == "active"
    assert story.status(vm)["locked"] is True
    assert "locked" in story.systemd_status_line(vm)

    # Plugged while locked: the daemon waits and says so; nothing is imported.
    story.replug(vm, disk)
    story.wait_for(vm, "the disk to wait for unlock",
                   lambda: story.disk_phase(vm, disk.label) == "waiting for unlock", 120)
    assert "zbackupd unlock" in story.systemd_status_line(vm)
    assert vm.run("zpool list -H -o name").stdout.split() == ["tank"]

    story.unlock(vm)
    story.wait_powered_off(vm, disk)
    first = story.last_run(vm, disk.label)
    assert first["ok"], first
    assert first["bytes_sent"] > 8 << 20  # three datasets with 6 MiB of random data each
    assert f"{disk.label}: ok" in story.systemd_status_line(vm)
    journal = vm.run(f"journalctl -u zbackupd --no-pager -o cat DISK={usb.serial}").stdout
    assert "transfer finished" in journal
    run_records = vm.run(
        f"journalctl -u zbackupd --no-pager -o cat RUN_ID={first['run_id']}"
    ).stdout
    assert "run finished" in run_records

    # What landed: the server's newest snapshot of every dataset, encrypted as designed.
    vm.run("systemctl stop zbackupd", timeout=240)
    story.replug(vm, disk)
    story.import_for_inspection(vm, disk)
    try:
        server_guids = story.server_newest_guids(vm, server)
        assert story.disk_newest_guids(vm, disk) == server_guids
        base = f"{disk.pool_name}/backup/{story.SOURCE_NAME}"
        secure = vm.run(f"zfs get -H -o value encryptionroot,keystatus {base}/tank/secure")
        assert secure.stdout.split() == [f"{base}/tank/secure", "unavailable"]
        plain = vm.run(f"zfs get -H -o value encryption,encryptionroot {base}/tank/plain")
        assert plain.stdout.split() == ["aes-256-gcm", disk.pool_name]
        mounted = vm.run(f"zfs get -H -o value -r mounted {disk.pool_name}").stdout.split()
        assert set(mounted) <= {"no", "-"}
    finally:
        story.export(vm, disk)

    # New writes on the server, plug again: only the increment travels.
    vm.run(server.ssh("dd if=/dev/urandom of=/tank/plain/third.bin bs=1M count=1 status=none"))
    story.start_daemon(vm)
    story.unlock(vm)
    story.replug(vm, disk)
    story.wait_for(vm, "the second run to start",
                   lambda: story.last_run(vm, disk.label)["run_id"] != first["run_id"])
    story.wait_powered_off(vm, disk)
    second = story.last_run(vm, disk.label)
    assert second["ok"], second
    assert second["bytes_sent"] < first["bytes_sent"] // 4, (first, second)
    print(f"full run sent {first['bytes_sent']} bytes, incremental {second['bytes_sent']}")

    # The first run's snapshots were pruned on the server: per dataset exactly
    # keep_own_snapshots (1) of zbackupd's own remain, the one the disk holds as its newest.
    assert story.server_own_snapshots(vm, server) == {
        dataset: [guid] for dataset, guid in story.inspect_newest_guids(vm, disk).items()
    }


def test_impostor_is_refused_and_nothing_imported(
    vm: Vm, installed: str, usb_disk: UsbDiskFactory
) -> None:
    real = usb_disk(serial="ZBREAL01", size=512 << 20)
    disk = story.init_disk(vm, real, "story-b")
    vm.unplug_usb_disk(real)
    # Same serial, another pool: what a swapped disk in a lying enclosure looks like.
    fake = usb_disk(serial="ZBREAL01", size=512 << 20)
    vm.run(f"zpool create -f -O mountpoint=none intruder {fake.by_id} && zpool export intruder")
    story.start_daemon(vm)
    story.unlock(vm)
    vm.unplug_usb_disk(fake)
    vm.plug_usb_disk(fake.serial, fake.size_bytes, image=fake.image)
    story.wait_for(vm, "the impostor to be refused",
                   lambda: story.disk_phase(vm, disk.label) == "refused", 120)
    assert "refusing disk with serial ZBREAL01" in story.systemd_status_line(vm)
    assert vm.run("zpool list -H -o name").stdout.split() == ["tank"]


def test_coldplugged_disk_is_backed_up_once(
    vm: Vm, installed: str, usb_disk: UsbDiskFactory
) -> None:
    usb = usb_disk(serial="ZBCOLD01", size=1 << 30)
    disk = story.init_disk(vm, usb, "story-c")
    story.start_daemon(vm)  # the disk is already attached
    story.unlock(vm)
    story.wait_powered_off(vm, disk)
    state = json.loads(vm.run(f"cat {story.STATE_FILE}").stdout)
    runs = state["runs"][disk.label]
    assert len(runs) == 1, runs
    assert runs[0]["ok"], runs


def test_service_runs_hardened_and_without_core_dumps(vm: Vm, installed: str) -> None:
    story.start_daemon(vm)
    pid = vm.run("systemctl show -P MainPID zbackupd").stdout.strip()
    assert pid != "0"
    proc_status = vm.run(f"cat /proc/{pid}/status").stdout
    assert "NoNewPrivs:\t1" in proc_status
    assert "Seccomp:\t2" in proc_status  # SystemCallFilter=, MemoryDenyWriteExecute=
    bounding = next(line for line in proc_status.splitlines() if line.startswith("CapBnd:"))
    assert int(bounding.split()[1], 16) == 1 << 21, bounding  # CAP_SYS_ADMIN only
    limits = vm.run(f"grep 'Max core file size' /proc/{pid}/limits").stdout.split()
    assert limits[4:6] == ["0", "0"], limits
    settings = dict(
        line.split("=", 1)
        for line in vm.run(
            "systemctl show -p ProtectSystem,ProtectHome,PrivateTmp,MemorySwapMax,UMask,"
            "RestrictNamespaces,Type,WatchdogUSec,DevicePolicy,ProtectKernelTunables,"
            "MemoryDenyWriteExecute,ProtectProc zbackupd"
        ).stdout.splitlines()
    )
    assert settings["ProtectSystem"] == "strict"
    assert settings["ProtectHome"] == "yes"
    assert settings["PrivateTmp"] == "yes"
    assert settings["MemorySwapMax"] == "0"
    assert settings["UMask"] == "0077"
    assert settings["Type"] == "notify"
    assert settings["WatchdogUSec"] == "1min"
    assert settings["DevicePolicy"] == "closed"
    assert settings["ProtectKernelTunables"] == "yes"
    assert settings["MemoryDenyWriteExecute"] == "yes"
    assert settings["ProtectProc"] == "invisible"
    # Kernel tunables are read-only, but /sys/devices stays writable for the power-off.
    def mount_options(path: str) -> list[str]:
        return vm.run(f"nsenter -t {pid} -m findmnt -n -o OPTIONS -T {path}").stdout.split(",")
    assert "ro" in mount_options("/proc/sys")
    assert "ro" in mount_options("/sys/module")
    assert "rw" in mount_options("/sys/devices")
    # The read-only file system is real: the daemon's mount namespace refuses /usr writes.
    refused = vm.run(f"nsenter -t {pid} -m touch /usr/zbackupd-probe", check=False)
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr


def test_udev_rule_starts_the_daemon_when_a_disk_is_plugged(
    vm: Vm, installed: str, usb_disk: UsbDiskFactory
) -> None:
    usb = usb_disk(serial="ZBUDEV01", size=512 << 20)
    disk = story.init_disk(vm, usb, "udev-a")
    vm.unplug_usb_disk(usb)
    vm.run("zbackupd udev-rule > /etc/udev/rules.d/90-zbackupd.rules && "
           "udevadm control --reload && systemctl stop zbackupd")
    assert vm.run("systemctl is-active zbackupd", check=False).stdout.strip() != "active"
    try:
        vm.plug_usb_disk(usb.serial, usb.size_bytes, image=usb.image)
        story.wait_for(vm, "udev to start zbackupd",
                       lambda: vm.run("systemctl is-active zbackupd", check=False)
                       .stdout.strip() == "active", 120)
        story.wait_for(vm, "the started daemon to see the disk",
                       lambda: story.disk_phase(vm, disk.label) == "waiting for unlock", 120)
    finally:
        vm.run("rm -f /etc/udev/rules.d/90-zbackupd.rules && udevadm control --reload")
