"""Streaming a remote ``zfs send`` into a local receiver, through a real asyncssh server.

The receiver stand-ins are real local processes run by ``LocalRunner``: what they read
arrives through the ``os.pipe()`` exactly as ``zfs receive`` would read it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from tests.integration.sshd import FakeServer, fake_server
from zbackupd.errors import CommandError
from zbackupd.server.remote import RemoteHost, RemoteUnavailable, connect
from zbackupd.server.transfer import TransferFailed, TransferProgress, TransferStalled, stream
from zbackupd.zfs.parse import DestinationModified
from zbackupd.zfs.runner import LocalRunner

__all__ = ["fake_server"]  # the fixture, imported for pytest

MiB = 1024 * 1024
SEND = ("zfs", "send", "-w", "pool/data@zbackupd-1")

#: Reads all of stdin and expects exactly argv[1] bytes, as zfs receive expects a whole
#: stream: fewer is "incomplete stream". Prints the SHA-256 of what it read.
EXPECT_BYTES = """
import hashlib, sys
digest, total = hashlib.sha256(), 0
while chunk := sys.stdin.buffer.read(1 << 20):
    digest.update(chunk); total += len(chunk)
if total != int(sys.argv[1]):
    sys.stderr.write(f"cannot receive: incomplete stream ({total} bytes)\\n"); sys.exit(1)
print(digest.hexdigest())
"""
#: Reads argv[1] bytes, then gives up like a receive into a modified destination.
GIVE_UP_AFTER = """
import sys
sys.stdin.buffer.read(int(sys.argv[1]))
sys.stderr.write("cannot receive incremental stream: destination pool/data has been modified\\n")
sys.exit(1)
"""
#: Reads argv[1] bytes, sleeps argv[2] seconds, then reads the rest: a slow disk.
STALL_AFTER = """
import sys, time
sys.stdin.buffer.read(int(sys.argv[1])); time.sleep(float(sys.argv[2]))
while sys.stdin.buffer.read(1 << 20): pass
"""


def receiver(script: str, *args: object) -> list[str]:
    return [sys.executable, "-c", script, *(str(a) for a in args)]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def child_pids() -> set[int]:
    me, children = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                children.add(int(entry.name))
    return children


@pytest.fixture
async def remote(fake_server: FakeServer) -> AsyncIterator[RemoteHost]:
    async with await connect(fake_server.target(), fake_server.client_key) as host:
        yield host


async def test_streams_64_mib_intact_with_checksum(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    fake_server.state.send_size = 64 * MiB
    fds_before = open_fds()
    result = await stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, 64 * MiB))
    [sent] = fake_server.state.sent
    assert sent.argv == SEND
    assert sent.finished
    assert result.receive.text.strip() == sent.sha256
    assert result.bytes_transferred == 64 * MiB
    assert result.send.returncode == 0
    assert result.receive.returncode == 0
    assert open_fds() == fds_before
    assert child_pids() == set()


async def test_progress_is_reported_at_most_once_per_interval(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    size = 8 * MiB
    fake_server.state.send_size = size
    fake_server.state.chunk_delay = 0.05  # 32 chunks of 256 KiB: about 1.6 s
    samples: list[tuple[float, TransferProgress]] = []
    result = await stream(
        remote,
        SEND,
        LocalRunner(),
        receiver(EXPECT_BYTES, size),
        estimated_total=size,
        on_progress=lambda p: samples.append((time.monotonic(), p)),
        progress_interval=0.25,
    )
    assert result.bytes_transferred == size
    assert len(samples) >= 3
    times = [t for t, _ in samples]
    assert all(later - earlier >= 0.24 for earlier, later in itertools.pairwise(times))
    done = [p.bytes_done for _, p in samples]
    assert done == sorted(done)
    assert 0 < done[0] < size
    for _, progress in samples:
        assert progress.estimated_total == size
        assert progress.rate > 0
        assert progress.eta is not None
        assert progress.eta == pytest.approx((size - progress.bytes_done) / progress.rate)
    # About 5 MiB/s by construction; a wildly different rate means the counting is wrong.
    assert 0.5 * MiB < samples[-1][1].rate < 50 * MiB


async def test_no_progress_callback_for_a_transfer_shorter_than_the_interval(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    fake_server.state.send_size = 1 * MiB
    samples: list[TransferProgress] = []
    await stream(
        remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, MiB), on_progress=samples.append
    )
    assert samples == []


async def test_failed_send_blames_the_send_side(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    fake_server.state.send_size = 0
    fake_server.state.send_exit_status = 1
    fake_server.state.send_stderr = "cannot open 'pool/data@zbackupd-1': dataset does not exist\n"
    with pytest.raises(TransferFailed) as caught:
        await stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, MiB))
    error = caught.value
    assert error.side == "send"
    assert isinstance(error.cause, CommandError)
    assert error.cause.argv == SEND
    assert "dataset does not exist" in error.cause.stderr
    # The receiver saw a truncated stream: a consequence, kept as `other`.
    assert isinstance(error.other, CommandError)
    assert "incomplete stream" in error.other.stderr
    assert error.transient is False
    assert child_pids() == set()


async def test_failed_receive_is_classified_and_stops_the_sender(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    class OurOwnError(CommandError):
        pass

    def classify(argv: Sequence[str], returncode: int, stderr: str) -> CommandError:
        if "has been modified" in stderr:
            return OurOwnError(argv, returncode, stderr)
        return CommandError(argv, returncode, stderr)

    size = 256 * MiB
    fake_server.state.send_size = size
    fds_before = open_fds()
    receive_argv = receiver(GIVE_UP_AFTER, MiB)
    with pytest.raises(TransferFailed) as caught:
        await stream(remote, SEND, LocalRunner(), receive_argv, classify_receive=classify)
    error = caught.value
    assert error.side == "receive"
    assert isinstance(error.cause, OurOwnError)
    assert error.other is None  # the channel we closed is no second failure
    assert error.cause.argv == tuple(receive_argv)
    assert error.bytes_transferred < size
    [sent] = fake_server.state.sent
    assert not sent.finished
    # At most about the window (16 MiB) plus buffers went out after the receiver stopped.
    assert sent.bytes_written < 64 * MiB
    assert open_fds() == fds_before
    assert child_pids() == set()
    await _until(lambda: fake_server.state.open_processes == 0)


async def test_backpressure_bounds_what_is_in_flight(fake_server: FakeServer) -> None:
    size, window = 128 * MiB, 2 * MiB
    fake_server.state.send_size = size
    async with await connect(
        fake_server.target(window_bytes=window), fake_server.client_key
    ) as remote:
        transfer = asyncio.create_task(
            stream(remote, SEND, LocalRunner(), receiver(STALL_AFTER, 4 * MiB, 1.5))
        )
        await asyncio.sleep(1.0)  # the receiver has read 4 MiB and stalls
        [sent] = fake_server.state.sent
        in_flight = sent.bytes_written
        result = await transfer
    assert result.bytes_transferred == size
    # What the receiver read, plus what asyncssh lets in: it re-opens the window to the
    # full size when half is used, so up to about 2 windows sit in its buffer, plus the
    # pipe. Without backpressure all 128 MiB would have been sent by now.
    assert 4 * MiB <= in_flight <= 4 * MiB + 2 * window + 2 * MiB


async def test_dropped_link_mid_transfer_is_a_transient_send_failure(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    fake_server.state.send_size = 64 * MiB
    fake_server.state.drop_after_bytes = 8 * MiB
    with pytest.raises(TransferFailed) as caught:
        await stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, 64 * MiB))
    error = caught.value
    assert error.side == "send"
    assert isinstance(error.cause, RemoteUnavailable)
    assert error.transient is True
    assert 0 < error.bytes_transferred < 64 * MiB
    assert child_pids() == set()


async def test_a_send_that_stops_sending_is_a_transient_stall(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    """The server's ``zfs send`` hangs after 2 MiB (the connection still answers): the
    step is aborted after ``stall_timeout`` without a byte, the receive killed (``zfs
    receive -s`` keeps its resume token), the channel closed."""
    fake_server.state.send_size = 64 * MiB
    fake_server.state.hang_after_bytes = 2 * MiB
    fds_before = open_fds()
    started = time.monotonic()
    with pytest.raises(TransferStalled) as caught:
        await asyncio.wait_for(
            stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, 64 * MiB),
                   stall_timeout=0.5),
            10,
        )
    elapsed = time.monotonic() - started
    error = caught.value
    assert error.transient is True
    assert error.stalled_for == 0.5
    assert error.bytes_transferred == 2 * MiB
    assert error.send_argv == SEND
    assert "no data moved for 0.5 s after 2097152 bytes" in str(error)
    assert elapsed < 5, elapsed
    assert child_pids() == set()
    await _until(lambda: open_fds() == fds_before)
    again = await remote.run(["echo-argv", "ok"])  # the connection itself is still good
    assert again.returncode == 0


async def test_a_receiver_that_stops_reading_is_a_stall_too(fake_server: FakeServer) -> None:
    """A USB bridge that stops answering: the receive stops reading, the pipe and the
    window fill, no byte moves: the same abort."""
    fake_server.state.send_size = 64 * MiB
    async with await connect(
        fake_server.target(window_bytes=1 * MiB), fake_server.client_key
    ) as remote:
        with pytest.raises(TransferStalled) as caught:
            await asyncio.wait_for(
                stream(remote, SEND, LocalRunner(), receiver(STALL_AFTER, 1 * MiB, 60),
                       stall_timeout=0.5),
                10,
            )
    assert caught.value.transient is True
    assert caught.value.bytes_transferred < 8 * MiB
    assert child_pids() == set()


async def test_a_slow_transfer_that_keeps_moving_is_no_stall(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    fake_server.state.send_size = 4 * MiB
    fake_server.state.chunk_delay = 0.1  # 16 chunks: 1.6 s, never 0.5 s without a byte
    result = await stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, 4 * MiB),
                          stall_timeout=0.5)
    assert result.bytes_transferred == 4 * MiB


async def test_a_silent_link_mid_transfer_is_detected_by_keepalives(
    fake_server: FakeServer,
) -> None:
    """The cable is cut: the server neither sends nor answers keepalives. Without any
    stall timeout the keepalives (interval x count) end the transfer, as transient."""
    fake_server.state.send_size = 64 * MiB
    fake_server.state.freeze_after_bytes = 2 * MiB
    target = fake_server.target(keepalive_interval=0.2, keepalive_count_max=3)
    async with await connect(target, fake_server.client_key) as remote:
        started = time.monotonic()
        with pytest.raises(TransferFailed) as caught:
            await asyncio.wait_for(
                stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, 64 * MiB)), 10
            )
        elapsed = time.monotonic() - started
    assert isinstance(caught.value.cause, RemoteUnavailable)
    assert caught.value.transient is True
    assert "keepalive" in str(caught.value)
    assert elapsed < 3, elapsed
    assert child_pids() == set()


async def test_cancellation_stops_both_sides_and_leaks_nothing(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    size = 64 * MiB
    fake_server.state.send_size = size
    fake_server.state.chunk_delay = 0.02  # 256 chunks: about 5 s
    fds_before = open_fds()
    transfer = asyncio.create_task(
        stream(remote, SEND, LocalRunner(), receiver(EXPECT_BYTES, size))
    )
    await _until(lambda: bool(fake_server.state.sent) and bool(child_pids()))
    await asyncio.sleep(0.3)
    transfer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await transfer
    assert child_pids() == set()
    # The subprocess transports close their pipes on later loop turns (seen under load:
    # one pipe still open right after the cancel, gone a moment later); a leak stays.
    await _until(lambda: open_fds() == fds_before)
    await _until(lambda: fake_server.state.open_processes == 0)
    [sent] = fake_server.state.sent
    assert not sent.finished
    # The connection itself is still good for the next dataset.
    again = await remote.run(["echo-argv", "ok"])
    assert again.returncode == 0


async def _until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def test_receive_stderr_is_classified_by_the_zfs_parser_by_default(
    fake_server: FakeServer, remote: RemoteHost
) -> None:
    fake_server.state.send_size = 4 * MiB
    modified = (
        "import sys; sys.stdin.buffer.read(1 << 20); sys.stderr.write("
        "'cannot receive incremental stream: destination pool/data has been modified\\n"
        "since most recent snapshot\\n'); sys.exit(1)"
    )
    with pytest.raises(TransferFailed) as caught:
        await stream(remote, SEND, LocalRunner(), [sys.executable, "-c", modified])
    assert caught.value.side == "receive"
    assert isinstance(caught.value.cause, DestinationModified)
    assert caught.value.transient is caught.value.cause.transient


SIGTERM_CHILD = """
import asyncio, json, signal, sys
import asyncssh
from zbackupd.server.remote import SshTarget, connect
from zbackupd.server.transfer import stream
from zbackupd.zfs.runner import LocalRunner

async def main() -> int:
    settings = json.loads(sys.stdin.readline())
    key = asyncssh.import_private_key(settings.pop("client_key"))
    async with await connect(SshTarget(**settings), key) as remote:
        sink = [sys.executable, "-c", "import sys\\nwhile sys.stdin.buffer.read(1 << 20): pass"]
        task = asyncio.create_task(stream(remote, ["zfs", "send", "p/d@s"], LocalRunner(), sink))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            print("cancelled", flush=True)
            return 143
    return 0

sys.exit(asyncio.run(main()))
"""


def _children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


async def test_sigterm_mid_transfer_stops_both_sides(fake_server: FakeServer) -> None:
    """A daemon-like process cancels its transfer on SIGTERM: receiver reaped, channel closed."""
    fake_server.state.send_size = 256 * MiB
    fake_server.state.chunk_delay = 0.02  # about 20 s if nobody stops it
    settings = {
        "host": "127.0.0.1",
        "port": fake_server.port,
        "user": "zbackupd",
        "host_key": fake_server.host_key.export_public_key().decode(),
        "client_key": fake_server.client_key.export_private_key().decode(),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIGTERM_CHILD,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert child.stdin is not None
    child.stdin.write(json.dumps(settings).encode() + b"\n")
    await child.stdin.drain()
    await _until(lambda: bool(fake_server.state.sent) and bool(_children_of(child.pid)), 15.0)
    [receiver_pid] = _children_of(child.pid)
    await _until(lambda: fake_server.state.sent[0].bytes_written > MiB)
    child.send_signal(signal.SIGTERM)
    stdout, _ = await asyncio.wait_for(child.communicate(), 15.0)
    assert child.returncode == 143
    assert stdout == b"cancelled\n"
    assert not Path(f"/proc/{receiver_pid}").exists()
    await _until(lambda: fake_server.state.open_processes == 0)
    assert not fake_server.state.sent[0].finished
