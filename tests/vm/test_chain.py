"""Issue 11 for real: the chain of custody between server and disk.

- A zvol under a root is received (``volmode=none``, ``readonly=on``: no ``/dev/zd*``
  for it on the backup host), and an excluded child gets no run snapshots (one atomic
  snapshot of exactly the selected datasets, not ``zfs snapshot -r``).
- ``kill -9`` of the daemon mid-transfer: the next run resumes, completes, and nothing the
  disk held before is lost; afterwards each dataset has exactly one cursor of the disk, at
  what the disk holds, and no hold of the disk is left on the server.

Event-driven throughout: every wait is on the daemon's status or the guest's state.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.story import BackupDisk
from tests.vm.topology import BackupServer

pytestmark = pytest.mark.vm

VOLUME = "tank/plain/vol"
EXCLUDED = "tank/plain/nobackup"
#: Big enough that a transfer is still running when it is killed (~2 MB/s under TCG).
BIG_MIB = 64
KILL_AFTER_BYTES = 16 << 20


def _on_server(vm: Vm, server: BackupServer, script: str, timeout: float = 120) -> str:
    return vm.run(server.ssh(shlex.quote(script)), timeout=timeout).stdout


def _exclude_in_config(vm: Vm, present: bool) -> None:
    """Add (or remove) ``exclude = ["nobackup"]`` under the ``tank/plain`` root."""
    line = 'exclude = ["nobackup"]'
    if present:
        vm.run(f"sed -i 's|^root = \"tank/plain\"$|&\\n{line}|' {story.CONFIG_PATH}")
    else:
        vm.run(f"sed -i '/^{re.escape(line)}$/d' {story.CONFIG_PATH}")


def _zvol_nodes(vm: Vm) -> set[str]:
    return set(vm.run("ls /dev/zd* 2>/dev/null || true").stdout.split())


def _backed_up_once(vm: Vm, disk: BackupDisk, previous: str | None,
                    check: Any = None) -> dict[str, Any]:  # fmt: skip
    """Plug ``disk`` in, wait until its next run is recorded and it is powered off.
    ``check()`` runs at every poll meanwhile (state sampled while the daemon works)."""
    story.replug(vm, disk)

    def finished() -> bool:
        if check is not None:
            check()
        run = _last_run_or_none(vm, disk.label)
        return (run is not None and run["run_id"] != previous
                and not story.disk_present(vm, disk.usb)
                and story.disk_phase(vm, disk.label) in ("done", "failed", "refused"))  # fmt: skip

    story.wait_for(vm, f"disk {disk.label} backed up and powered off", finished, 900)
    return story.last_run(vm, disk.label)


def _last_run_or_none(vm: Vm, label: str) -> dict[str, Any] | None:
    found = vm.run(f"test -e {story.STATE_FILE}", check=False).returncode == 0
    if not found or f'"{label}"' not in vm.run(f"cat {story.STATE_FILE}").stdout:
        return None
    return story.last_run(vm, label)


def _cursors(vm: Vm, server: BackupServer, label: str) -> dict[str, list[int]]:
    """This disk's cursor bookmarks (legacy ``zbackupd_<label>`` or ``…:<guid>``) per
    dataset on the server: their guids."""
    listing = _on_server(vm, server, "zfs list -H -p -t bookmark -o name,guid -r "
                         + " ".join(story.ROOTS))  # fmt: skip
    pattern = re.compile(rf"(.+)#zbackupd_{re.escape(label)}(:[0-9]+)?")
    found: dict[str, list[int]] = {}
    for line in listing.splitlines():
        name, guid = line.split("\t")
        match = pattern.fullmatch(name)
        if match:
            found.setdefault(match.group(1), []).append(int(guid))
    return found


def _holds_of(vm: Vm, server: BackupServer, tag: str) -> list[str]:
    """Snapshots under the roots that carry hold ``tag``."""
    held = _on_server(vm, server, "zfs get -H -p -o name,value -t snapshot -r userrefs "
                      + " ".join(story.ROOTS))  # fmt: skip
    names = [line.split("\t")[0] for line in held.splitlines() if line.split("\t")[1] != "0"]
    if not names:
        return []
    listing = _on_server(vm, server, "zfs holds -H " + " ".join(names))
    return [line.split("\t")[0] for line in listing.splitlines() if line.split("\t")[1] == tag]


def _assert_one_cursor_at_the_newest(vm: Vm, server: BackupServer, disk: BackupDisk,
                                     newest: dict[str, int]) -> None:  # fmt: skip
    cursors = _cursors(vm, server, disk.label)
    assert cursors == {dataset: [guid] for dataset, guid in newest.items()}, (cursors, newest)
    assert _holds_of(vm, server, f"zbackupd_{disk.label}") == []


def test_a_zvol_is_received_without_a_device_and_an_excluded_child_is_never_snapshotted(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    _on_server(vm, server, f"zfs create -V 16M {VOLUME} && zfs create {EXCLUDED} && "
               f"udevadm settle && dd if=/dev/urandom of=/dev/zvol/{VOLUME} bs=1M count=4 "
               "oflag=direct status=none")  # fmt: skip
    _exclude_in_config(vm, present=True)
    try:
        disk = story.init_disk(vm, usb_disk(serial="ZBCHAIN01", size=1 << 30), "chain-a")
        vm.unplug_usb_disk(disk.usb)
        server_nodes = _zvol_nodes(vm)  # the server's own volume (same kernel in this VM)
        assert server_nodes, "the server's zvol should have a /dev/zd* node"
        story.start_daemon(vm)
        story.unlock(vm)
        exposed: list[str] = []

        def no_disk_volume_nodes() -> None:
            if _zvol_nodes(vm) - server_nodes:
                exposed.append(" ".join(sorted(_zvol_nodes(vm) - server_nodes)))
            if vm.run(f"test -e /dev/zvol/{disk.pool_name}", check=False).returncode == 0:
                exposed.append(f"/dev/zvol/{disk.pool_name}")

        first = _backed_up_once(vm, disk, None, no_disk_volume_nodes)
        assert first["ok"], first
        assert VOLUME in {result["dataset"] for result in first["datasets"]}, first
        assert EXCLUDED not in {result["dataset"] for result in first["datasets"]}, first
        _on_server(vm, server, f"dd if=/dev/urandom of=/dev/zvol/{VOLUME} bs=1M count=1 "
                   "seek=8 oflag=direct status=none")  # fmt: skip
        second = _backed_up_once(vm, disk, first["run_id"], no_disk_volume_nodes)
        assert second["ok"], second
        assert exposed == [], exposed

        # Two runs, no run snapshot of the excluded child (zfs snapshot -r took them).
        excluded = _on_server(vm, server, f"zfs list -H -t snapshot -o name -r {EXCLUDED}")
        assert "@zbackupd_" not in excluded, excluded

        vm.run("systemctl stop zbackupd", timeout=240)
        story.replug(vm, disk)
        story.import_for_inspection(vm, disk)
        try:
            newest = story.disk_newest_guids(vm, disk)
            assert newest == story.server_newest_guids(vm, server)
            target = f"{disk.pool_name}/backup/{story.SOURCE_NAME}/{VOLUME}"
            props = vm.run(f"zfs get -H -o value type,volmode,readonly {target}").stdout
            assert props.split() == ["volume", "none", "on"], props
        finally:
            story.export(vm, disk)
        _assert_one_cursor_at_the_newest(vm, server, disk, newest)
    finally:
        _exclude_in_config(vm, present=False)
        _on_server(vm, server, f"zfs destroy -r {VOLUME}; zfs destroy -r {EXCLUDED}; true")


def test_kill_9_mid_transfer_loses_nothing_and_the_next_run_completes(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    disk = story.init_disk(vm, usb_disk(serial="ZBCHAIN02", size=2 << 30), "chain-k")
    vm.unplug_usb_disk(disk.usb)
    story.start_daemon(vm)
    story.unlock(vm)
    before = _backed_up_once(vm, disk, None)
    assert before["ok"], before
    kept = {f"{result['dataset']}@{result['newest_snapshot']}" for result in before["datasets"]}

    _on_server(vm, server, f"dd if=/dev/urandom of=/tank/plain/killed.bin bs=1M "
               f"count={BIG_MIB} status=none", timeout=300)  # fmt: skip
    story.replug(vm, disk)

    def under_way() -> bool:
        for entry in story.status(vm)["disks"]:
            progress = entry.get("progress") or {}
            if (entry["label"] == disk.label and entry["phase"] == "transferring"
                    and progress.get("bytes_done", 0) >= KILL_AFTER_BYTES):  # fmt: skip
                return True
        return False

    story.wait_for(vm, f"disk {disk.label} transferring", under_way, 600)
    killed = vm.run("systemctl show -P MainPID zbackupd").stdout.strip()
    vm.run(f"kill -9 {killed}")
    story.wait_for(vm, "systemd to see the daemon die",
                   lambda: vm.run("systemctl show -P MainPID zbackupd").stdout.strip()
                   != killed, 120)  # fmt: skip

    # The disk is still attached (its pool possibly still imported): restart, unlock, and
    # coldplug starts the next run.
    story.start_daemon(vm)
    story.unlock(vm)

    def next_run_done() -> bool:
        run = _last_run_or_none(vm, disk.label)
        return (run is not None and run["run_id"] != before["run_id"]
                and not story.disk_present(vm, disk.usb)
                and story.disk_phase(vm, disk.label) in ("done", "failed", "refused"))  # fmt: skip

    story.wait_for(vm, f"disk {disk.label}'s run after the kill", next_run_done, 900)
    after = story.last_run(vm, disk.label)
    assert after["ok"], after
    print(f"run after kill -9 sent {after['bytes_sent']} bytes")

    vm.run("systemctl stop zbackupd", timeout=240)
    story.replug(vm, disk)
    story.import_for_inspection(vm, disk)
    try:
        newest = story.disk_newest_guids(vm, disk)
        assert newest == story.server_newest_guids(vm, server)
        on_disk = set(vm.run(f"zfs list -H -t snapshot -o name -r {disk.pool_name}/backup")
                      .stdout.split())  # fmt: skip
        prefix = f"{disk.pool_name}/backup/{story.SOURCE_NAME}/"
        assert {prefix + name for name in kept} <= on_disk, (kept, on_disk)
    finally:
        story.export(vm, disk)
    _assert_one_cursor_at_the_newest(vm, server, disk, newest)
