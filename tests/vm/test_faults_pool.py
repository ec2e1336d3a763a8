"""The pool's faults of issue 12, for real: disks zbackupd must refuse after (or instead
of) importing their pool, disks whose pools share a name, a power-off that fails, a pool
the admin imported by hand. The daemon runs under systemd in the guest as in
``test_daemon.py``; every wait is on the daemon's status, never a fixed sleep.

Two tests, each proving several things with one backup run (a run takes 1 to 2 min in TCG):

- four disks plugged at once: two whose pools are both named ``backup`` (backed up
  concurrently under their temporary names), one of another key (refused after the
  import: exported, unmapped, left powered on), one whose pool is named otherwise on the
  disk (refused before any import);
- one disk whose power-off fails (a process holds one of its partitions exclusively): the
  backup still counts, with a warning; then its pool is imported by hand and the daemon
  restarted: refused, left exactly as it is, and the last success survives the refusal.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.story import BackupDisk
from tests.vm.topology import GUEST_VENV, BackupServer

pytestmark = pytest.mark.vm

#: A partition ZFS makes on a whole disk besides the pool's own (part1): reserved, unused.
RESERVED_PARTITION = "-part9"
HOLDER_PID = "/run/zbt-holder.pid"


def _disk_status(vm: Vm, label: str) -> dict[str, Any]:
    for disk in story.status(vm)["disks"]:
        if disk["label"] == label:
            return dict(disk)
    return {}


def _imported(vm: Vm) -> list[str]:
    return vm.run("zpool list -H -o name").stdout.split()


def _mappings(vm: Vm) -> str:
    return vm.run("dmsetup ls").stdout


def _snapshots(vm: Vm, pool: str) -> set[tuple[str, str]]:
    """(name, guid) of every snapshot in ``pool`` (imported under that name)."""
    listing = vm.run(f"zfs list -H -p -t snapshot -o name,guid -r {pool}").stdout
    return {(name, guid) for name, guid in (line.split("\t") for line in listing.splitlines())}


def _refused(vm: Vm, disk: BackupDisk) -> dict[str, Any]:
    story.wait_for(vm, f"disk {disk.label} refused",
                   lambda: story.disk_phase(vm, disk.label) == "refused", 300)
    return _disk_status(vm, disk.label)


def test_twins_share_a_pool_name_while_a_wrong_key_and_a_misnamed_pool_are_refused(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    twins = [story.init_disk(vm, usb_disk(serial=f"ZBTWIN0{n}", size=1 << 30), f"twin-{n}",
                             pool_name="backup") for n in (1, 2)]  # fmt: skip
    # Set up under one label, configured under another: its key is another disk's.
    wrong_key = story.init_disk(vm, usb_disk(serial="ZBWKEY01", size=512 << 20), "wk-init",
                                pool_name="backup", label_in_config="wrongkey")
    misnamed = story.init_disk(vm, usb_disk(serial="ZBMISN01", size=512 << 20), "misnamed",
                               pool_name_in_config="elsewhere")
    disks = [*twins, wrong_key, misnamed]
    assert [d.pool_name for d in disks] == ["backup", "backup", "backup", "zbk-misnamed"]
    for disk in disks:
        vm.unplug_usb_disk(disk.usb)
    story.start_daemon(vm)
    story.unlock(vm)
    for disk in disks:
        story.replug(vm, disk)

    refused_key = _refused(vm, wrong_key)
    refused_name = _refused(vm, misnamed)
    for disk in twins:
        story.wait_powered_off(vm, disk)
    runs = [story.last_run(vm, disk.label) for disk in twins]
    assert all(run["ok"] for run in runs), runs
    assert all(run["bytes_sent"] > 8 << 20 for run in runs), runs
    # At the same time, although both pools are named "backup" on their disks.
    assert max(run["started"] for run in runs) < min(run["finished"] for run in runs), runs

    # The wrong key: imported, refused, then exported and unmapped; left powered on.
    assert "another installation or passphrase" in refused_key["message"], refused_key
    assert "pool exported, disk left powered on" in refused_key["message"], refused_key
    assert story.disk_present(vm, wrong_key.usb)
    journal = vm.run("journalctl -u zbackupd --no-pager -o cat "
                     f"DISK={wrong_key.usb.serial}").stdout
    assert "Key already unloaded" not in journal
    # The misnamed pool: refused from the import listing, never imported.
    assert "named 'zbk-misnamed', configured as 'elsewhere'" in refused_name["message"]
    assert story.disk_present(vm, misnamed.usb)
    assert "wrongkey: refused" in story.systemd_status_line(vm)
    assert _imported(vm) == ["tank"]
    assert "zbackupd-" not in _mappings(vm)
    print("twins:", [(run["run_id"], round(run["finished"] - run["started"])) for run in runs],
          "| refused:", refused_key["message"], "|", refused_name["message"])

    vm.run("systemctl stop zbackupd", timeout=240)
    for disk, run in zip(twins, runs, strict=True):
        story.inspect_own_run(vm, server, disk, run)  # imported as "backup": -t kept it
    for disk in (wrong_key, misnamed):  # untouched: still only what init-disk made
        story.import_for_inspection(vm, disk)
        try:
            datasets = vm.run(f"zfs list -H -o name -r {disk.pool_name}").stdout.split()
            assert datasets == [disk.pool_name, f"{disk.pool_name}/backup"], datasets
            assert _snapshots(vm, disk.pool_name) == set()
        finally:
            story.export(vm, disk)
    assert _imported(vm) == ["tank"]


def _hold_exclusively(vm: Vm, device: str) -> None:
    """A process that holds ``device`` open with ``O_EXCL`` (as a mount would), until
    killed; returns once it does."""
    script = (
        "import os, time\n"
        f"fd = os.open({device!r}, os.O_RDONLY | os.O_EXCL)\n"
        f"open({HOLDER_PID!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(3600)\n"
    )
    vm.run(f"rm -f {HOLDER_PID}; setsid -f {GUEST_VENV}/bin/python -c {shlex.quote(script)} "
           "</dev/null >/dev/null 2>&1")
    story.wait_for(vm, f"a process holding {device}",
                   lambda: vm.run(f"test -s {HOLDER_PID}", check=False).returncode == 0, 60)


def test_failed_power_off_is_a_warning_then_a_pool_imported_by_hand_is_left_alone(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    usb = usb_disk(serial="ZBHAND01", size=1 << 30)
    disk = story.init_disk(vm, usb, "hand-a")
    vm.unplug_usb_disk(usb)
    story.start_daemon(vm)
    story.replug(vm, disk)
    story.wait_for(vm, "the disk to wait for unlock",
                   lambda: story.disk_phase(vm, disk.label) == "waiting for unlock", 120)
    # The power-off opens every block device of the disk O_EXCL: this one is taken.
    _hold_exclusively(vm, usb.by_id + RESERVED_PARTITION)
    try:
        story.unlock(vm)
        story.wait_for(vm, "the backup to finish",
                       lambda: story.disk_phase(vm, disk.label) == "done", 600)
        first = story.last_run(vm, disk.label)
        shown = _disk_status(vm, disk.label)
    finally:
        vm.run(f"kill $(cat {HOLDER_PID})")
    assert first["ok"], first
    assert "warning: disk hand-a not powered off" in first["summary"], first
    assert "pool exported: safe to unplug" in first["summary"], first
    assert shown["last_success"] == first["finished"], shown
    assert story.disk_present(vm, usb)
    assert _imported(vm) == ["tank"]
    assert "zbackupd-hand-a" not in _mappings(vm)

    # The admin imports the pool by hand (no key loaded), then the daemon sees the disk.
    vm.run("systemctl stop zbackupd", timeout=240)
    vm.run(f"zpool import -N -o cachefile=none -d {disk.partition} {disk.pool_guid}",
           timeout=120)
    before = _snapshots(vm, disk.pool_name)
    assert before, "the first run left snapshots on the disk"
    story.start_daemon(vm)
    story.unlock(vm)  # coldplug: the attached disk starts a session
    refused = _refused(vm, disk)
    try:
        assert (f"pool {disk.pool_name} is imported by someone else: export it to let "
                "zbackupd back up this disk") in refused["message"], refused
        assert sorted(_imported(vm)) == sorted([disk.pool_name, "tank"])  # same name
        vdevs = vm.run(f"zpool status -P {disk.pool_name}").stdout
        assert disk.partition in vdevs, vdevs  # not moved onto a mapping
        assert "zbackupd-hand-a" not in _mappings(vm)
        keystatus = vm.run(f"zfs get -H -o value keystatus {disk.pool_name}").stdout.strip()
        assert keystatus == "unavailable"
        # The refusal is a failed run; the status still says when the disk last succeeded.
        assert not story.last_run(vm, disk.label)["ok"]
        assert refused["last_success"] == first["finished"], refused
        journal = vm.run("journalctl -u zbackupd --no-pager -o cat "
                         f"DISK={usb.serial}").stdout
        assert "pool imported by someone else: not touched" in journal
        vm.run("systemctl stop zbackupd", timeout=240)
        assert _snapshots(vm, disk.pool_name) == before  # the earlier backup survives
    finally:
        story.export(vm, disk)
    assert _imported(vm) == ["tank"]
