"""The Zfs facade over a recording fake Runner, and LocalRunner for real."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from zbackupd.core.model import Snapshot
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult, CommandTimeout, LocalRunner


@dataclass
class Call:
    argv: tuple[str, ...]
    stdin_secret: bytes | None
    timeout: float | None
    check: bool


@dataclass
class RecordingRunner:
    """Answers each command with the next scripted (returncode, stdout, stderr)."""

    replies: list[tuple[int, str, str]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin_secret: bytearray | None = None,
        stdin_fd: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        assert stdin_fd is None
        self.calls.append(
            Call(
                tuple(argv),
                bytes(stdin_secret) if stdin_secret is not None else None,
                timeout,
                check,
            )
        )
        returncode, stdout, stderr = self.replies.pop(0) if self.replies else (0, "", "")
        return CommandResult(tuple(argv), returncode, stdout.encode(), stderr)


async def test_list_snapshots_builds_runs_and_parses() -> None:
    runner = RecordingRunner([(0, "xpool/a@s1\t7\t10\t1700000000\n", "")])
    snapshots = await Zfs(runner, timeout=30).list_snapshots(["xpool/a"])
    assert snapshots == (Snapshot("xpool/a@s1", 7, 10, 1700000000),)
    assert runner.calls[0].argv[:3] == ("zfs", "list", "-H")
    assert runner.calls[0].argv[-1] == "xpool/a"
    assert runner.calls[0].timeout == 30
    assert runner.calls[0].check is False  # the facade classifies failures itself


async def test_failures_become_typed_errors() -> None:
    runner = RecordingRunner([(1, "", "cannot export 'xpool': pool I/O is currently suspended\n")])
    with pytest.raises(parse.PoolSuspended) as caught:
        await Zfs(runner).export_pool("xpool")
    assert caught.value.transient is True
    assert caught.value.argv == ("zpool", "export", "xpool")


async def test_dataset_state_collects_what_the_planner_needs() -> None:
    runner = RecordingRunner(
        [
            (0, "xpool/a\treceive_resume_token\t1-ab-cd-ef\nxpool/a\twritten\t4096\n", ""),
            (0, "xpool/a@s1\t7\t10\t1\nxpool/a#m\t7\t10\t1\n", ""),
        ]
    )
    state = await Zfs(runner).dataset_state("xpool/a")
    assert state.name == "xpool/a"
    assert [s.name for s in state.snapshots] == ["xpool/a@s1"]
    assert [b.name for b in state.bookmarks] == ["xpool/a#m"]
    assert state.receive_resume_token == "1-ab-cd-ef"
    assert state.written_since_last_snapshot == 4096


async def test_dataset_state_of_a_missing_target_says_so() -> None:
    runner = RecordingRunner([(1, "", "cannot open 'xpool/a': dataset does not exist\n")])
    with pytest.raises(parse.DatasetNotFound):
        await Zfs(runner).dataset_state("xpool/a")


async def test_load_key_sends_the_key_on_stdin_only() -> None:
    runner = RecordingRunner()
    key = bytearray(b"\x01" * 32)
    await Zfs(runner).load_key("xpool", key, check_only=True)
    call = runner.calls[0]
    assert call.argv == ("zfs", "load-key", "-L", "prompt", "-n", "xpool")
    assert call.stdin_secret == b"\x01" * 32
    assert not any("\x01" in arg for arg in call.argv)


async def test_wrong_key_is_typed_and_its_message_holds_no_key() -> None:
    runner = RecordingRunner([(255, "", "Key load error: Incorrect key provided for 'xpool'.\n")])
    key = bytearray(b"S3CRET-KEY-MATERIAL-0123456789ab")
    with pytest.raises(parse.KeyIncorrect) as caught:
        await Zfs(runner).load_key("xpool", key)
    assert "S3CRET" not in str(caught.value)
    assert "S3CRET" not in repr(caught.value.argv)


async def test_pool_operations_issue_the_expected_commands() -> None:
    runner = RecordingRunner([(0, "", ""), (0, "", ""), (0, "xpool\t99\tDEGRADED\n", "")])
    zfs = Zfs(runner)
    await zfs.import_pool("/dev/disk/by-id/usb-X-0:0-part1", 99, temp_name="zb_d1")
    await zfs.clear_pool("zb_d1")
    assert await zfs.pool_health("xpool") is parse.PoolHealth.DEGRADED
    assert [c.argv[:2] for c in runner.calls] == [
        ("zpool", "import"),
        ("zpool", "clear"),
        ("zpool", "list"),
    ]
    assert "-f" not in runner.calls[0].argv


async def test_snapshot_changes_issue_one_command_each() -> None:
    runner = RecordingRunner()
    zfs = Zfs(runner)
    await zfs.hold("zbackupd_d1", ["xpool/a@s1"])
    await zfs.release("zbackupd_d1", ["xpool/a@s1"])
    await zfs.destroy_snapshots("xpool/a", ["s1", "s2"])
    await zfs.receive_abort("xpool/a")
    await zfs.unload_key("xpool")
    assert [c.argv for c in runner.calls] == [
        ("zfs", "hold", "zbackupd_d1", "xpool/a@s1"),
        ("zfs", "release", "zbackupd_d1", "xpool/a@s1"),
        ("zfs", "destroy", "xpool/a@s1,s2"),
        ("zfs", "receive", "-A", "xpool/a"),
        ("zfs", "unload-key", "xpool"),
    ]


# -- LocalRunner, for real ---------------------------------------------------------------

ECHO_SELF = (
    "import json, os, sys; "
    "data = sys.stdin.buffer.read(); "
    "print(json.dumps({'argv': sys.argv, 'env': dict(os.environ), 'stdin': data.hex()}))"
)


async def test_local_runner_passes_the_secret_on_stdin_and_nowhere_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    secret = bytearray(b"top-secret-key-bytes-0123456789!")
    result = await LocalRunner().run(
        [sys.executable, "-c", ECHO_SELF], stdin_secret=secret, timeout=30
    )
    seen = json.loads(result.text)
    assert bytes.fromhex(seen["stdin"]) == bytes(secret)
    assert not any("top-secret" in arg for arg in seen["argv"])
    assert not any("top-secret" in value for value in seen["env"].values())
    assert "NOTIFY_SOCKET" not in seen["env"]
    assert seen["env"]["LC_ALL"] == "C"


async def test_local_runner_kills_a_command_that_overruns() -> None:
    with pytest.raises(CommandTimeout) as caught:
        await LocalRunner().run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert caught.value.transient is True
    assert caught.value.timeout == 0.5


async def test_create_placeholder_makes_each_missing_level_and_keeps_existing_ones() -> None:
    runner = RecordingRunner(
        [(1, "", "cannot create 'xpool/backup': dataset already exists\n"), (0, "", "")]
    )
    await Zfs(runner).create_placeholder("xpool/backup/site1")
    assert [c.argv for c in runner.calls] == [
        ("zfs", "create", "-o", "canmount=off", "-o", "mountpoint=none", "xpool/backup"),
        ("zfs", "create", "-o", "canmount=off", "-o", "mountpoint=none", "xpool/backup/site1"),
    ]


async def test_create_placeholder_reports_other_failures() -> None:
    runner = RecordingRunner([(1, "", "cannot create 'xpool/b': out of space\n")])
    with pytest.raises(parse.OutOfSpace):
        await Zfs(runner).create_placeholder("xpool/b")


async def test_available_bytes_is_zfs_get_available_on_the_pool_root() -> None:
    runner = RecordingRunner([(0, "zbackup\tavailable\t1073741824\n", "")])
    assert await Zfs(runner).available_bytes("zbackup") == 1073741824
    assert runner.calls[0].argv == ("zfs", "get", "-H", "-p", "-o", "name,property,value",
                                    "available", "zbackup")  # fmt: skip
    broken = RecordingRunner([(0, "zbackup\tavailable\t-\n", "")])
    with pytest.raises(parse.ParseError):
        await Zfs(broken).available_bytes("zbackup")
