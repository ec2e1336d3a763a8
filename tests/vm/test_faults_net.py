"""Network faults, for real (issue 12 #4/#8): the backup server's link cut mid-stream, and
the server unreachable when the disk is plugged in. Both must end in the same plug-in,
without the admin: the cut is detected (keepalives, stall timeout), the source retried
with backoff while the disk stays attached, the interrupted receive resumed from its
token. The link is cut on the server's side of the veth pair (``srv0`` in the ``server``
namespace): the extbackup side keeps its route, packets simply vanish, as on a cable
pulled somewhere between the two machines.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.vm import story
from tests.vm.conftest import UsbDiskFactory
from tests.vm.controller import Vm
from tests.vm.story import BackupDisk
from tests.vm.topology import SERVER_NAMESPACE, BackupServer

pytestmark = pytest.mark.vm

#: Short retries and keepalives: detection within ~20 s, retries every 5 to 30 s.
DAEMON = (
    "retry_window_seconds = 400\n"
    "retry_backoff_seconds = [5, 10, 20, 30]\n"
    "stall_timeout_seconds = 20\n"
)
#: A 2 MiB window: what is lost in flight at a cut stays small against the stream.
SOURCE = 'keepalive_interval = 5.0\nkeepalive_count_max = 3\nwindow_bytes = "2 MiB"\n'
BIG_MIB = 120
CUT_AFTER_BYTES = 24 << 20
CUT_SECONDS = 30
#: A cut link must surface as a transient error within this bound (keepalives 5 s x 3).
DETECTION_BOUND_SECONDS = 60


@pytest.fixture(scope="module")
def installed(vm: Vm, server: BackupServer, zbackupd_version: str) -> Iterator[str]:
    """The first setup with the short retry, stall and keepalive settings above."""
    line = story.first_setup(vm, server, daemon=DAEMON, source=SOURCE)
    yield line
    link(vm, up=True)
    vm.run("systemctl stop zbackupd || true", check=False, timeout=240)


def link(vm: Vm, *, up: bool) -> None:
    vm.run(f"ip -n {SERVER_NAMESPACE} link set srv0 {'up' if up else 'down'}")


def _disk_status(vm: Vm, label: str) -> dict[str, Any]:
    return next((dict(d) for d in story.status(vm)["disks"] if d["label"] == label), {})


def _retrying(vm: Vm, label: str) -> str | None:
    message = str(_disk_status(vm, label).get("message", ""))
    return message if message.startswith(f"retrying server {story.SOURCE_NAME} in ") else None


def _journal_entries(vm: Vm, run_id: str) -> list[dict[str, Any]]:
    lines = vm.run(f"journalctl -u zbackupd --no-pager -o json RUN_ID={run_id}").stdout
    return [json.loads(line) for line in lines.splitlines() if line.strip()]


def _big_file_on_server(vm: Vm, server: BackupServer, name: str) -> None:
    vm.run(server.ssh(f"dd if=/dev/urandom of=/tank/plain/{name} bs=1M count={BIG_MIB} "
                      "status=none"), timeout=300)  # fmt: skip


def _fresh_disk(vm: Vm, usb_disk: UsbDiskFactory, serial: str, label: str) -> BackupDisk:
    disk = story.init_disk(vm, usb_disk(serial=serial, size=2 << 30), label)
    vm.unplug_usb_disk(disk.usb)
    return disk


def test_link_cut_mid_stream_resumes_from_the_token_in_the_same_plug_in(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    disk = _fresh_disk(vm, usb_disk, "ZBNET01", "net-cut")
    _big_file_on_server(vm, server, "net-cut.bin")
    story.start_daemon(vm)
    story.unlock(vm)
    story.replug(vm, disk)
    progress: dict[str, Any] = {}

    def big_stream_under_way() -> bool:
        status = _disk_status(vm, disk.label)
        progress.update(status.get("progress") or {})
        return (status.get("phase") == "transferring" and progress.get("dataset") == "tank/plain"
                and progress.get("bytes_done", 0) >= CUT_AFTER_BYTES)  # fmt: skip

    story.wait_for(vm, "the big stream under way", big_stream_under_way, 600)
    run_id = _disk_status(vm, disk.label)["run_id"]
    link(vm, up=False)
    cut_at = time.monotonic()
    try:
        story.wait_for(vm, "the cut detected and a retry scheduled",
                       lambda: _retrying(vm, disk.label) is not None,
                       DETECTION_BOUND_SECONDS)  # fmt: skip
        detected_after = time.monotonic() - cut_at
        seen = _retrying(vm, disk.label)
        # The interrupted receive kept its token (the pool is still imported, by the daemon).
        target = f"{disk.imported_as}/backup/{story.SOURCE_NAME}/tank/plain"
        token = vm.run(f"zfs get -H -o value receive_resume_token {target}").stdout.strip()
        assert token not in ("", "-"), token
        time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    finally:
        link(vm, up=True)

    story.wait_powered_off(vm, disk, 600)
    run = story.last_run(vm, disk.label)
    assert run["ok"], run
    assert run["run_id"] == run_id  # the same plug-in: no second session
    entries = _journal_entries(vm, run_id)
    # The interruption's own entry carries the bytes asyncssh had received at the cut (the
    # connection attempts that failed afterwards have none).
    interrupted = [e for e in entries if "failed transiently" in e.get("MESSAGE", "")
                   and str(e.get("BYTES_TRANSFERRED", "None")).isdigit()]  # fmt: skip
    assert interrupted, [e.get("MESSAGE") for e in entries]
    before_cut = int(interrupted[0]["BYTES_TRANSFERRED"])
    assert any("resume the interrupted receive" in e.get("MESSAGE", "") for e in entries)
    # zfs prints the token's contents, then refuses the dry run when the token's snapshot
    # was pruned after the run (it usually is): the contents are what counts here.
    contents = vm.run(server.ssh(f"zfs send -nvt {token}"), check=False).stdout
    match = re.search(r"\bbytes = (0x[0-9a-fA-F]+|\d+)", contents)
    assert match is not None, contents
    offset = int(match.group(1), 0)
    [plain] = [d for d in run["datasets"] if d["dataset"] == "tank/plain"]
    stream_bytes = offset + plain["bytes_sent"]  # received before the cut + the resume
    resent = before_cut - offset
    print(f"cut after {progress.get('bytes_done')} bytes, detected after {detected_after:.0f}s "
          f"({seen}); token at {offset}, asyncssh had {before_cut}: re-sent {resent} of "
          f"{stream_bytes} bytes ({100 * resent / stream_bytes:.1f} %)")
    assert detected_after < DETECTION_BOUND_SECONDS
    assert 0 <= resent < stream_bytes / 10

    vm.run("systemctl stop zbackupd", timeout=240)
    story.inspect_own_run(vm, server, disk, run)


def test_server_unreachable_at_plug_in_is_retried_until_it_is_back(
    vm: Vm, server: BackupServer, installed: str, usb_disk: UsbDiskFactory
) -> None:
    disk = _fresh_disk(vm, usb_disk, "ZBNET02", "net-down")
    story.start_daemon(vm)
    story.unlock(vm)
    link(vm, up=False)
    try:
        story.replug(vm, disk)
        plugged_at = time.monotonic()
        story.wait_for(vm, "a retry of the unreachable server",
                       lambda: _retrying(vm, disk.label) is not None, 120)  # fmt: skip
        assert "retrying server" in story.systemd_status_line(vm)
        seen = _retrying(vm, disk.label)
        time.sleep(max(0.0, 75 - (time.monotonic() - plugged_at)))
    finally:
        link(vm, up=True)
    back_at = time.monotonic() - plugged_at

    story.wait_powered_off(vm, disk, 400)
    state = json.loads(vm.run(f"cat {story.STATE_FILE}").stdout)
    runs = state["runs"][disk.label]
    assert len(runs) == 1, runs  # one plug-in, one run: no re-plug needed
    run = runs[0]
    assert run["ok"], run
    retries = [e for e in _journal_entries(vm, run["run_id"])
               if "failed transiently" in e.get("MESSAGE", "")]  # fmt: skip
    assert retries, "the unreachable server was retried"
    print(f"server back after {back_at:.0f}s; {len(retries)} failed attempt(s), first status: "
          f"{seen}; run took {run['finished'] - run['started']:.0f}s")

    vm.run("systemctl stop zbackupd", timeout=240)
    story.inspect_own_run(vm, server, disk, run)
