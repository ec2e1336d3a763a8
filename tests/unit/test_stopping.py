"""The stop with a process stuck in the kernel: it is named, with what to do, and the
stop does not wait for it (issue 12 item 9). The kernel side is in the VM suite
(tests/vm/test_faults.py, ``daemon-stopped-while-pulled``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from structlog.testing import capture_logs

from zbackupd.service.stopping import (
    ChildProcess,
    own_children,
    parse_stat,
    stop_sessions,
    stuck_message,
)

RECEIVE = ChildProcess(1403, "S", "cv_wait_common",
                       ("zfs", "receive", "-s", "-u", "zbackupd-pulled-3/backup/server/tank"))


def test_stat_fields_are_counted_after_the_last_parenthesis() -> None:
    assert parse_stat("1403 (zfs) S 871 1403 1403 0 -1 4194560 1 0") == ("S", 871)
    assert parse_stat("77 (a (b) c) D 12 77 77 0 -1") == ("D", 12)


def fake_proc(root: Path, pid: int, stat: str, argv: bytes, wchan: str) -> None:
    entry = root / str(pid)
    entry.mkdir()
    (entry / "stat").write_text(stat)
    (entry / "cmdline").write_bytes(argv)
    (entry / "wchan").write_text(wchan)


def test_only_live_children_of_the_parent_are_listed(tmp_path: Path) -> None:
    fake_proc(tmp_path, 1403, "1403 (zfs) S 871 0", b"zfs\0receive\0-s\0pool/ds\0",
              "cv_wait_common")
    fake_proc(tmp_path, 1500, "1500 (zpool) Z 871 0", b"", "0")  # a zombie: reaped soon
    fake_proc(tmp_path, 1600, "1600 (sshd) S 1 0", b"sshd\0", "do_select")  # not ours
    (tmp_path / "self").mkdir()
    assert own_children(tmp_path, parent=871) == [
        ChildProcess(1403, "S", "cv_wait_common", ("zfs", "receive", "-s", "pool/ds"))
    ]


def test_a_real_child_is_found_in_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found = [c for c in own_children() if c.pid == child.pid]
        assert len(found) == 1
        assert found[0].argv[1:] == ("-c", "import time; time.sleep(30)")
    finally:
        child.kill()
        child.wait()


def test_the_message_names_the_process_why_and_what_to_do() -> None:
    message = stuck_message(RECEIVE, ["pulled-3"])
    assert message.startswith("zfs receive -s -u zbackupd-pulled-3/backup/server/tank "
                              "(pid 1403) is stuck in the kernel (state S, waiting in "
                              "cv_wait_common) and cannot be killed")
    assert "re-plug disk pulled-3 and start zbackupd to finish the backup, or reboot" in message
    assert "reboot" in stuck_message(RECEIVE, [])


async def test_stop_does_not_wait_for_a_stuck_child_and_names_it() -> None:
    async def aborting_session() -> None:
        await asyncio.sleep(3600)

    session = asyncio.create_task(aborting_session())
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await asyncio.wait_for(
            stop_sessions([session], grace=5, pulled={"pulled-3"}, children=lambda: [RECEIVE]),
            timeout=2)
    assert session.cancelled()
    (line,) = [entry for entry in logs if entry.get("pid") == 1403]
    assert line["log_level"] == "error"
    assert "re-plug disk pulled-3" in line["event"]


def test_a_long_or_odd_argv_stays_one_bounded_line() -> None:
    odd = ChildProcess(7, "D", "", ("zfs", "receive", "pool/a\nb" + "x" * 400))
    message = stuck_message(odd, ["pulled-3"])
    assert "\n" not in message
    assert "pool/a\\nb" in message
    assert "...(truncated) (pid 7)" in message
