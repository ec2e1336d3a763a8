"""Faults, for real: a disk pulled mid-transfer, SIGTERM mid-transfer, two disks at once.

The daemon runs under systemd in the guest (as in ``test_daemon.py``); the faults are
injected the way they happen: QMP ``device_del`` of the USB disk while ``zfs receive``
writes to it, ``systemctl stop`` while a stream is running. Every test ends by importing
the disk itself and comparing snapshot GUIDs with the server's.

What pulling the disk really does in this guest (OpenZFS 2.3.2, ZED not running): the
pool first stays ONLINE while its sync thread retries writes to the vanished device (the
receive waits on it in the kernel); about 90 s later ZFS gives up and SUSPENDs the pool.
Re-plugged before that, only ``zpool reopen`` picks the disk up (``zpool clear`` alone
would wait for the stuck sync); after it, ``zpool clear`` resumes the suspended pool. The
pulled-disk test covers both. See ``zbackupd.service.pool.revive_steps``.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.story import BackupDisk
from tests.vm.topology import GUEST_VENV, BackupServer

pytestmark = pytest.mark.vm

#: Size of the file that makes a transfer last long enough to interrupt (~2 MB/s in TCG).
BIG_MIB = 120
#: Interrupt once this much of the stream has arrived.
INTERRUPT_AFTER_BYTES = 24 << 20
#: The unit's TimeoutStopSec: a clean stop must come well before systemd's SIGKILL.
TIMEOUT_STOP_SECONDS = 180

#: One request on the control socket, timed inside the guest: the daemon's own latency,
#: without the seconds the CLI spends importing Python modules under TCG.
_TIMED_STATUS = (
    "import asyncio, pathlib, time\n"
    "from zbackupd.service.control import request\n"
    "started = time.monotonic()\n"
    "asyncio.run(request(pathlib.Path('/run/zbackupd/control.sock'), 'status', timeout=60))\n"
    "print(time.monotonic() - started)\n"
)



# -- helpers ----------------------------------------------------------------------------



def _disk_status(vm: Vm, label: str) -> dict[str, Any]:
    for disk in story.status(vm)["disks"]:
        if disk["label"] == label:
            return dict(disk)
    return {}



def _wait_transferring(vm: Vm, disk: BackupDisk) -> dict[str, Any]:
    """Poll until the stream of the big dataset is under way; return that progress."""
    seen: dict[str, Any] = {}

    def under_way() -> bool:
        status = _disk_status(vm, disk.label)
        progress = status.get("progress") or {}
        seen.update(progress)
        return (status.get("phase") == "transferring"
                and progress.get("bytes_done", 0) >= INTERRUPT_AFTER_BYTES)  # fmt: skip

    story.wait_for(vm, f"disk {disk.label} transferring", under_way, 600)
    return seen


def _control_latency(vm: Vm) -> float:
    """Seconds the daemon takes to answer one ``status`` request on its socket."""
    script = shlex.quote(_TIMED_STATUS)
    return float(vm.run(f"{GUEST_VENV}/bin/python -c {script}", timeout=90).stdout)


def _imported_pools(vm: Vm) -> list[str]:
    return vm.run("zpool list -H -o name").stdout.split()


def _big_file_on_server(vm: Vm, server: BackupServer, name: str) -> None:
    vm.run(server.ssh(f"dd if=/dev/urandom of=/tank/plain/{name} bs=1M count={BIG_MIB} "
                      "status=none"), timeout=300)  # fmt: skip


def _disk_snapshots(vm: Vm, disk: BackupDisk) -> set[tuple[str, int]]:
    """(snapshot name, guid) of everything on the disk; the pool must be imported."""
    listing = vm.run(
        f"zfs list -H -p -t snapshot -o name,guid -r {disk.pool_name}/backup"
    ).stdout
    return {(name, int(guid)) for name, guid in (line.split("\t") for line in
                                                 listing.splitlines())}  # fmt: skip


def _inspect(vm: Vm, server: BackupServer, disk: BackupDisk) -> set[tuple[str, int]]:
    """With the daemon stopped: the disk holds the server's newest snapshot of every
    dataset (by GUID); returns all its snapshots."""
    story.replug(vm, disk)
    story.import_for_inspection(vm, disk)
    try:
        assert story.disk_newest_guids(vm, disk) == story.server_newest_guids(vm, server)
        return _disk_snapshots(vm, disk)
    finally:
        story.export(vm, disk)


def _journal(vm: Vm, *filters: str) -> str:
    return vm.run(f"journalctl -u zbackupd --no-pager -o verbose {' '.join(filters)}").stdout


# -- the faults ---------------------------------------------------------------------------


def test_two_disks_at_once_are_backed_up_concurrently(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    first = story.init_disk(vm, usb_disk(serial="ZBDUO01", size=1 << 30), "duo-a")
    second = story.init_disk(vm, usb_disk(serial="ZBDUO02", size=1 << 30), "duo-b")
    for disk in (first, second):
        vm.unplug_usb_disk(disk.usb)
    story.start_daemon(vm)
    story.unlock(vm)
    for disk in (first, second):
        story.replug(vm, disk)
    for disk in (first, second):
        story.wait_powered_off(vm, disk)
    runs = [story.last_run(vm, disk.label) for disk in (first, second)]
    assert all(run["ok"] for run in runs), runs
    assert all(run["bytes_sent"] > 8 << 20 for run in runs), runs
    # Concurrent, not one after the other: each started before the other finished.
    assert max(run["started"] for run in runs) < min(run["finished"] for run in runs), runs
    assert not {first.imported_as, second.imported_as} & set(_imported_pools(vm))
    print("two disks:", [(run["run_id"], round(run["finished"] - run["started"]))
                         for run in runs])  # fmt: skip

    vm.run("systemctl stop zbackupd", timeout=240)
    for disk, run in zip((first, second), runs, strict=True):
        story.inspect_own_run(vm, server, disk, run)


def test_sigterm_mid_transfer_exports_then_resumes(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    usb = usb_disk(serial="ZBTERM01", size=2 << 30)
    disk = story.init_disk(vm, usb, "stopped")
    vm.unplug_usb_disk(usb)
    _big_file_on_server(vm, server, "stopped.bin")
    story.start_daemon(vm)
    story.unlock(vm)
    story.replug(vm, disk)
    at_stop = _wait_transferring(vm, disk)

    started = time.monotonic()
    vm.run("systemctl stop zbackupd", timeout=TIMEOUT_STOP_SECONDS + 60)
    stop_seconds = time.monotonic() - started
    assert stop_seconds < TIMEOUT_STOP_SECONDS, stop_seconds
    assert vm.run("systemctl show -P Result zbackupd").stdout.strip() == "success"
    assert disk.imported_as not in _imported_pools(vm)  # aborted, then exported
    assert not vm.run("pgrep -f '^zfs receive' || true").stdout.strip()  # no receive left

    # The interrupted receive left its resume token on the disk.
    target = f"{disk.pool_name}/backup/{story.SOURCE_NAME}/{at_stop['dataset']}"
    story.import_for_inspection(vm, disk)
    try:
        token = vm.run(f"zfs get -H -o value receive_resume_token {target}").stdout.strip()
    finally:
        story.export(vm, disk)
    assert token not in ("", "-"), token

    story.start_daemon(vm)
    story.unlock(vm)  # the disk is still attached: coldplug starts the next run
    story.wait_powered_off(vm, disk)
    resumed = story.last_run(vm, disk.label)
    assert resumed["ok"], resumed
    assert "resume the interrupted receive" in _journal(vm, f"RUN_ID={resumed['run_id']}")
    print(f"stopped after {at_stop.get('bytes_done')} of {at_stop.get('bytes_total')} bytes "
          f"in {stop_seconds:.1f}s; resumed run sent {resumed['bytes_sent']} bytes")

    vm.run("systemctl stop zbackupd", timeout=240)
    _inspect(vm, server, disk)


#: How long the disk stays away at most in the "minutes" case: until ZFS SUSPENDs the pool
#: (~90 s after the pull seen under the daemon) or this long.
SUSPEND_WAIT_SECONDS = 240


def _pool_state(vm: Vm, pool: str) -> str:
    """The kernel's own word on the pool (no zpool command, which could wait on it)."""
    return vm.run(f"cat /proc/spl/kstat/zfs/{pool}/state", check=False).stdout.strip()


def _stay_away_until_suspended(vm: Vm, disk: story.BackupDisk, latencies: list[float]) -> None:
    """Long enough for ZFS to give up on the disk: the hard case, which no zpool command
    alone recovers from. The daemon keeps answering and saying what to do meanwhile."""
    deadline = time.monotonic() + SUSPEND_WAIT_SECONDS
    while time.monotonic() < deadline and _pool_state(vm, disk.imported_as) != "SUSPENDED":
        time.sleep(10)
    assert f"re-plug disk {disk.label} to finish" in story.systemd_status_line(vm)
    assert max([*latencies, _control_latency(vm)]) < 5.0
    assert _pool_state(vm, disk.imported_as) == "SUSPENDED"


def _assert_revived(vm: Vm, disk: story.BackupDisk, *, by_a_new_daemon: bool) -> None:
    journal = _journal(vm, f"DISK={disk.usb.serial}")
    if by_a_new_daemon:
        assert "pool still imported from an earlier pull: reviving" in journal
    else:
        assert "pulled disk is back" in journal
        assert "pool revived after re-plug" in journal
    assert "mapping re-pointed at the re-plugged disk" in journal
    # The mapping went with the export, before the power-off.
    assert vm.run(f"dmsetup table zbackupd-{disk.label}", check=False).returncode != 0


def _stop_with_a_receive_stuck_in_the_kernel(vm: Vm, disk: story.BackupDisk) -> None:
    """``systemctl stop`` while the receive waits in the kernel for the pulled disk: the
    stop ends within TimeoutStopSec, not in systemd's stop timeout, and the journal names
    the stuck process and what to do."""
    stuck = vm.run("pgrep -f '^zfs receive'").stdout.split()
    assert stuck, "a zfs receive waits for the pulled disk"
    started = time.monotonic()
    vm.run("systemctl stop zbackupd", timeout=2 * TIMEOUT_STOP_SECONDS + 60)
    stop_seconds = time.monotonic() - started
    result = vm.run("systemctl show -P Result zbackupd").stdout.strip()
    journal = vm.run("journalctl -u zbackupd --no-pager -o cat -n 60").stdout
    print(f"stop with a stuck receive took {stop_seconds:.0f}s, result {result}; "
          f"stuck pids {stuck}")
    assert stop_seconds < TIMEOUT_STOP_SECONDS, (stop_seconds, journal)
    assert result == "success", journal
    assert f"(pid {stuck[0]}) is stuck in the kernel" in journal, journal
    assert f"re-plug disk {disk.label}" in journal, journal


# Last of the whole VM suite: if recovery ever fails, the guest keeps processes stuck in
# the kernel, which must not poison the other tests.
@pytest.mark.runs_last
@pytest.mark.parametrize(
    "away",
    ["briefly", "minutes", "stopped"],
    ids=["replugged-soon", "replugged-after-minutes", "daemon-stopped-while-pulled"],
)
def test_disk_pulled_mid_transfer_finishes_after_replug(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory, away: str
) -> None:
    """Re-plugged within seconds, the pool may still be ONLINE with its writes stuck;
    minutes later it is SUSPENDED, where no zpool command can move the vdev to the new
    device. Both must end with the transfer finished: the pool sits on a device-mapper
    mapping (devmap) that is re-pointed at the re-plugged disk, then cleared."""
    serial = {"briefly": "ZBPULL01", "minutes": "ZBPULL02", "stopped": "ZBPULL03"}[away]
    usb = usb_disk(serial=serial, size=2 << 30)
    disk = story.init_disk(vm, usb, f"pulled-{serial[-1]}")
    vm.unplug_usb_disk(usb)
    story.start_daemon(vm)
    story.unlock(vm)
    # A first, small backup: what is on the disk before the pull must survive it.
    story.replug(vm, disk)
    story.wait_powered_off(vm, disk)
    before = story.last_run(vm, disk.label)
    assert before["ok"], before
    kept = {f"{result['dataset']}@{result['newest_snapshot']}" for result in before["datasets"]}

    _big_file_on_server(vm, server, f"pulled-{serial}.bin")
    story.replug(vm, disk)
    at_pull = _wait_transferring(vm, disk)
    vm.unplug_usb_disk(usb)  # the cable, yanked
    pulled_at = time.monotonic()

    story.wait_for(vm, "the daemon to ask for the disk back",
                   lambda: story.disk_phase(vm, disk.label) == "suspended", 60)  # fmt: skip
    assert f"re-plug disk {disk.label} to finish" in story.systemd_status_line(vm)
    # The receive is stuck in the kernel, the daemon is not: it answers at once, again
    # and again, and keeps saying what to do whatever the stuck session reports.
    latencies = []
    for _ in range(3):
        latencies.append(_control_latency(vm))
        assert story.disk_phase(vm, disk.label) == "suspended"
        time.sleep(5)
    assert max(latencies) < 5.0, latencies
    evidence = vm.run(
        "zpool list -H -o name,health; ps -eo stat,wchan:24,args | grep '[z]fs receive' || true"
    ).stdout
    assert disk.imported_as in evidence  # still imported: the pending writes wait for the disk
    mapping = f"zbackupd-{disk.label}"
    assert f"/dev/mapper/{mapping}" in vm.run(f"dmsetup ls; ls -l /dev/mapper/{mapping}").stdout
    if away == "minutes":
        _stay_away_until_suspended(vm, disk, latencies)
    print(f"pulled after {at_pull.get('bytes_done')} bytes; daemon latency {latencies}; "
          f"pool {_pool_state(vm, disk.imported_as)} at re-plug; guest:\n{evidence}")

    if away == "stopped":
        _stop_with_a_receive_stuck_in_the_kernel(vm, disk)
    vm.plug_usb_disk(usb.serial, usb.size_bytes, image=usb.image)
    if away == "stopped":
        # A new daemon finds the pool still imported through its own mapping, revives it
        # and finishes the interrupted transfer in the run the re-plug starts.
        story.start_daemon(vm)
        story.unlock(vm)
    # Done, or the daemon gave up ("restart the machine"): no use waiting beyond that.
    story.wait_for(vm, f"disk {disk.label} finished after the re-plug",
                   lambda: "restart the machine" in story.systemd_status_line(vm)
                   or (not story.disk_present(vm, usb)
                       and story.disk_phase(vm, disk.label) in ("done", "failed")),
                   600)  # fmt: skip
    assert "restart the machine" not in story.systemd_status_line(vm)
    after = story.last_run(vm, disk.label)
    assert after["ok"], after
    assert after["run_id"] != before["run_id"]
    assert disk.imported_as not in _imported_pools(vm)
    _assert_revived(vm, disk, by_a_new_daemon=away == "stopped")
    print(f"re-plugged: finished {time.monotonic() - pulled_at:.0f}s after the pull; "
          f"run sent {after['bytes_sent']} bytes")  # fmt: skip

    vm.run("systemctl stop zbackupd", timeout=240)
    on_disk = {name.removeprefix(f"{disk.pool_name}/backup/{story.SOURCE_NAME}/")
               for name, _ in _inspect(vm, server, disk)}  # fmt: skip
    assert kept <= on_disk, (kept, on_disk)
