"""Issue 11 for real: the chain heals itself, and a wrong clock prunes nothing.

(a) A transfer stopped midway leaves a resume token; its snapshot is then destroyed on
the server (holds released first). The next run aborts the partial receive (``zfs
receive -A``), completes, and its journal says why.

(b) The disk holds snapshots of three days (taken with the guest's clock set back, so
they have real creation times); with the clock three years ahead, a run prunes nothing
and warns that the clock looks wrong. The server shares the guest's clock, so the
datasets are backed up in ``reuse`` mode: no run snapshot stamped by the wrong clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.test_faults import (
    TIMEOUT_STOP_SECONDS,
    _big_file_on_server,
    _disk_snapshots,
    _inspect,
    _journal,
    _wait_transferring,
)
from tests.vm.topology import BackupServer
from zbackupd.zfs import argv as zargv

pytestmark = pytest.mark.vm

DAY = 24 * 3600
THREE_YEARS = 3 * 365 * DAY


@contextmanager
def guest_clock(vm: Vm) -> Iterator[None]:
    """Whatever the test does to the guest's clock, it is right again afterwards (the
    true time: the clock at entry plus the seconds elapsed on the host)."""
    at_entry = int(vm.run("date +%s").stdout)
    started = time.monotonic()
    try:
        yield
    finally:
        vm.run(f"date -s @{at_entry + int(time.monotonic() - started)} >/dev/null")


def set_clock(vm: Vm, true_now: int, offset: int) -> None:
    vm.run(f"date -s @{true_now + offset} >/dev/null")


def test_a_resume_whose_snapshot_is_gone_is_aborted_and_the_run_completes(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    disk = story.init_disk(vm, usb_disk(serial="ZBHEAL01", size=2 << 30), "heal-resume")
    vm.unplug_usb_disk(disk.usb)
    _big_file_on_server(vm, server, "heal.bin")
    story.start_daemon(vm)
    story.unlock(vm)
    story.replug(vm, disk)
    at_stop = _wait_transferring(vm, disk)
    vm.run("systemctl stop zbackupd", timeout=TIMEOUT_STOP_SECONDS + 60)

    on_disk = f"{disk.pool_name}/backup/{story.SOURCE_NAME}/{at_stop['dataset']}"
    story.import_for_inspection(vm, disk)
    try:
        token = vm.run(f"zfs get -H -o value receive_resume_token {on_disk}").stdout.strip()
    finally:
        story.export(vm, disk)
    gone = zargv.decode_resume_token(token).toname  # the server snapshot it continues
    holds = vm.run(server.ssh(f"zfs holds -H {gone}")).stdout.splitlines()
    for tag in [line.split("\t")[1] for line in holds]:
        vm.run(server.ssh(f"zfs release {tag} {gone}"))
    vm.run(server.ssh(f"zfs destroy {gone}"))

    story.start_daemon(vm)
    story.unlock(vm)  # the disk is still attached: coldplug starts the next run
    story.wait_powered_off(vm, disk)
    run = story.last_run(vm, disk.label)
    assert run["ok"], run
    journal = _journal(vm, f"RUN_ID={run['run_id']}")
    target = f"{disk.imported_as}/backup/{story.SOURCE_NAME}/{at_stop['dataset']}"
    assert f"partial receive of {target} aborted: its snapshot {gone}" in journal
    assert "is gone from the server" in journal
    vm.run("systemctl stop zbackupd", timeout=240)
    _inspect(vm, server, disk)


def test_a_clock_years_ahead_prunes_nothing_and_warns(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    vm.run("systemctl stop zbackupd || true", timeout=240)
    config = story._config(server, vm)  # the story's config, changed below
    for root in story.ROOTS:
        config = config.replace(f'root = "{root}"\n', f'root = "{root}"\nsnapshots = '
                                '"reuse"\nreuse_pattern = "heal_*"\n')  # fmt: skip
    config = config.replace("keep_last = 2\ndaily = 0", "keep_last = 1\ndaily = 7")
    assert config.count('reuse_pattern = "heal_*"') == len(story.ROOTS), config
    assert "daily = 7" in config, config
    vm.run(f"install -D -m 0644 /dev/stdin {story.CONFIG_PATH}", stdin=config.encode())
    # The daemon holds the reused snapshot it sends: the server's gate must allow it.
    vm.run(f"install -D -m 0644 /dev/stdin {story.GATE_CONFIG}",
           stdin=(story._gate_config() + 'hold_patterns = ["heal_*"]\n').encode())
    disk = story.init_disk(vm, usb_disk(serial="ZBCLOCK1", size=1 << 30), "heal-clock")
    vm.unplug_usb_disk(disk.usb)
    with guest_clock(vm):
        true_now = int(vm.run("date +%s").stdout)
        for day in (1, 2, 3):  # heal_1 two days ago, heal_3 today: three daily buckets
            set_clock(vm, true_now, (day - 3) * DAY)
            snapshots = " ".join(f"{root}@heal_{day}" for root in story.ROOTS)
            vm.run(server.ssh(f"zfs snapshot -r {snapshots}"))
        set_clock(vm, true_now, 0)
        story.start_daemon(vm)
        story.unlock(vm)
        story.replug(vm, disk)
        story.wait_powered_off(vm, disk)
        assert story.last_run(vm, disk.label)["ok"]
        vm.run("systemctl stop zbackupd", timeout=240)
        story.replug(vm, disk)
        story.import_for_inspection(vm, disk)
        try:
            before = _disk_snapshots(vm, disk)
        finally:
            story.export(vm, disk)
        assert len([name for name, _ in before if "@heal_" in name]) >= 3 * len(story.ROOTS)

        set_clock(vm, true_now, THREE_YEARS)
        story.start_daemon(vm)
        story.unlock(vm)  # the disk is attached: coldplug starts the run
        story.wait_powered_off(vm, disk)
        run = story.last_run(vm, disk.label)
        journal = _journal(vm, f"RUN_ID={run['run_id']}")
        vm.run("systemctl stop zbackupd", timeout=240)
    assert run["ok"], run
    assert "clock looks wrong" in journal
    assert "not pruning" in journal
    story.replug(vm, disk)
    story.import_for_inspection(vm, disk)
    try:
        assert _disk_snapshots(vm, disk) == before  # nothing destroyed
    finally:
        story.export(vm, disk)
