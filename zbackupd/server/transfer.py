"""Remote ``zfs send`` → ``os.pipe()`` → local ``zfs receive``, with backpressure and progress.

The stream never passes through our own Python code a second time: asyncssh writes the
decrypted channel data straight into the pipe's write end, ``zfs receive`` reads the
other end as its stdin. When the receiver is slow the pipe fills, asyncssh stops
opening the channel window and the server's ``zfs send`` blocks: at most the window is
in flight. Progress counts the bytes asyncssh hands over (``len()`` only, no copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from zbackupd.errors import CommandError, TransientError, ZbackupdError
from zbackupd.server.remote import (
    Classifier,
    RemoteHost,
    RemoteStream,
    RemoteUnavailable,
)
from zbackupd.zfs.parse import classify_error
from zbackupd.zfs.runner import CommandResult, Runner

#: How long a sender may go on after its receiver finished successfully (it should not).
SENDER_GRACE_SECONDS = 30.0
#: How long to wait for the server to confirm the channel close when tearing down.
CLOSE_TIMEOUT_SECONDS = 5.0
#: The stall watchdog looks at the byte count this often (at most; a quarter of the
#: timeout when that is shorter): a stall is noticed within 1.25 x the timeout.
STALL_POLL_SECONDS = 5.0

Side = Literal["send", "receive"]


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """One progress sample: what the status line and the journal show."""

    bytes_done: int
    elapsed: float
    #: Bytes per second, smoothed (exponential moving average over the samples).
    rate: float
    estimated_total: int | None
    #: Seconds left at ``rate``; None without an estimate or before any rate is known.
    eta: float | None

    @property
    def fraction(self) -> float | None:
        if not self.estimated_total:
            return None
        return min(1.0, self.bytes_done / self.estimated_total)


ProgressCallback = Callable[[TransferProgress], None]


def next_progress(
    previous: TransferProgress | None,
    bytes_done: int,
    elapsed: float,
    estimated_total: int | None,
    *,
    smoothing: float = 0.3,
) -> TransferProgress:
    """The next sample from the previous one: pure, so the arithmetic is testable alone."""
    if previous is None:
        rate = bytes_done / elapsed if elapsed > 0 else 0.0
    else:
        interval = elapsed - previous.elapsed
        instant = (bytes_done - previous.bytes_done) / interval if interval > 0 else previous.rate
        rate = smoothing * instant + (1.0 - smoothing) * previous.rate
    eta: float | None = None
    if estimated_total is not None and rate > 0:
        eta = max(0.0, (estimated_total - bytes_done) / rate)
    return TransferProgress(bytes_done, elapsed, rate, estimated_total, eta)


@dataclass(frozen=True, slots=True)
class TransferResult:
    """A finished transfer: both exit statuses were 0."""

    bytes_transferred: int
    elapsed: float
    send: CommandResult
    receive: CommandResult

    @property
    def rate(self) -> float:
        return self.bytes_transferred / self.elapsed if self.elapsed > 0 else 0.0


class TransferFailed(ZbackupdError):
    """One side of a transfer failed; ``cause`` is that side's typed error.

    ``side`` names where the failure started (a receive that died makes the send fail
    too, and a send that died truncates the receive; only the first one is the cause).
    ``other`` is the other side's error, if it failed as a consequence.
    ``transient`` follows the cause: a dropped link is worth retrying (resume token),
    a modified destination is not.
    """

    def __init__(
        self,
        side: Side,
        cause: ZbackupdError,
        *,
        other: ZbackupdError | None,
        bytes_transferred: int,
    ) -> None:
        self.side: Side = side
        self.cause = cause
        self.other = other
        self.bytes_transferred = bytes_transferred
        self.transient = cause.transient
        super().__init__(f"{side} failed after {bytes_transferred} bytes: {cause}")


class TransferStalled(TransientError):
    """No byte of the stream moved for ``stalled_for`` seconds while the send was still
    running: a ``zfs send`` hung on the server, a link gone silent, or a receiver that
    stopped reading (a USB bridge that no longer answers). The step was aborted (channel
    closed, receive killed: ``zfs receive -s`` keeps its resume token), so a retry
    resumes it."""

    def __init__(
        self, send_argv: Sequence[str], *, stalled_for: float, bytes_transferred: int
    ) -> None:
        self.send_argv = tuple(send_argv)
        self.stalled_for = stalled_for
        self.bytes_transferred = bytes_transferred
        super().__init__(
            f"no data moved for {stalled_for:g} s after {bytes_transferred} bytes: "
            f"{' '.join(self.send_argv[:2])} aborted (the receive keeps its resume token)"
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one side ended: its result, or the error it ended with."""

    result: CommandResult | None
    error: ZbackupdError | None

    @property
    def failed(self) -> bool:
        return self.error is not None


def blame(send: _Outcome, receive: _Outcome, first: Side, *, send_aborted: bool) -> Side | None:
    """Which side caused a failed transfer, or None when both succeeded.

    A send we aborted because its receiver had failed is not a cause. A dropped link
    explains a truncated receive. Otherwise the side that failed first is the cause; the
    other one only reacted to it (EPIPE, or an early EOF).
    """
    if not send.failed and not receive.failed:
        return None
    if send_aborted and receive.failed:
        return "receive"
    if isinstance(send.error, RemoteUnavailable):
        return "send"
    if send.failed and receive.failed:
        return first
    return "send" if send.failed else "receive"


def _outcome(
    result: CommandResult, classify: Callable[[Sequence[str], int, str], CommandError]
) -> _Outcome:
    if result.returncode == 0:
        return _Outcome(result, None)
    return _Outcome(result, classify(result.argv, result.returncode, result.stderr))


@dataclass(frozen=True, slots=True)
class _ProgressSettings:
    callback: ProgressCallback
    interval: float
    estimated_total: int | None
    clock: Callable[[], float]


async def _report_progress(
    sender: RemoteStream, settings: _ProgressSettings, started: float
) -> None:
    previous: TransferProgress | None = None
    while True:
        await asyncio.sleep(settings.interval)
        previous = next_progress(
            previous, sender.bytes_received, settings.clock() - started, settings.estimated_total
        )
        settings.callback(previous)


async def stream(
    remote: RemoteHost,
    send_argv: Sequence[str],
    runner: Runner,
    receive_argv: Sequence[str],
    *,
    estimated_total: int | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval: float = 1.0,
    classify_receive: Classifier = classify_error,
    clock: Callable[[], float] = time.monotonic,
    stall_timeout: float | None = None,
) -> TransferResult:
    """Run ``send_argv`` on the server and pipe its stdout into local ``receive_argv``.

    Returns when both sides exited 0; raises ``TransferFailed`` naming the side that
    failed, with that side's stderr classified. Cancelling the calling task closes the
    channel, kills the receiver, waits for both and closes every descriptor.
    ``on_progress`` is called at most once per ``progress_interval`` seconds. With
    ``stall_timeout``, a stream that moves no byte for that long while the send runs is
    torn down the same way and raises ``TransferStalled`` (transient).
    """
    progress = (
        _ProgressSettings(on_progress, progress_interval, estimated_total, clock)
        if on_progress is not None
        else None
    )
    pipeline = _Pipeline(remote, runner, classify_receive, clock)
    try:
        await pipeline.start(send_argv, receive_argv, progress)
        if stall_timeout is None:
            return await pipeline.finish()
        return await pipeline.finish_unless_stalled(stall_timeout)
    finally:
        await pipeline.tear_down()


class _Pipeline:
    """The moving parts of one transfer, so that tear-down can find every one of them."""

    def __init__(
        self,
        remote: RemoteHost,
        runner: Runner,
        classify_receive: Classifier,
        clock: Callable[[], float],
    ) -> None:
        self._remote = remote
        self._runner = runner
        self._classify_receive = classify_receive
        self._clock = clock
        self._started = clock()
        self._read_fd: int | None = None
        self._sender: RemoteStream | None = None
        self._send_task: asyncio.Task[CommandResult] | None = None
        self._receive_task: asyncio.Task[CommandResult] | None = None
        self._progress_task: asyncio.Task[None] | None = None
        self._send_aborted = False

    async def start(
        self,
        send_argv: Sequence[str],
        receive_argv: Sequence[str],
        progress: _ProgressSettings | None,
    ) -> None:
        self._read_fd, write_fd = os.pipe()
        writer = os.fdopen(write_fd, "wb", buffering=0)
        try:
            # asyncssh owns the write end from here on and closes it when the channel ends.
            self._sender = await self._remote.start_stream(send_argv, writer)
        finally:
            if self._sender is None:
                writer.close()
        self._send_task = asyncio.create_task(self._sender.wait())
        self._receive_task = asyncio.create_task(
            self._runner.run(receive_argv, stdin_fd=self._read_fd, check=False)
        )
        if progress is not None:
            self._progress_task = asyncio.create_task(
                _report_progress(self._sender, progress, self._started)
            )

    async def finish(self) -> TransferResult:
        sender, send_task, receive_task = self._sender, self._send_task, self._receive_task
        if sender is None or send_task is None or receive_task is None:
            raise RuntimeError("finish() called before a successful start()")
        done, _ = await asyncio.wait({send_task, receive_task}, return_when=asyncio.FIRST_COMPLETED)
        first: Side = "receive" if receive_task in done else "send"
        if first == "receive":
            await self._after_receive_exited(receive_task.result(), sender, send_task)
        try:
            send = _outcome(await send_task, self._remote.classify)
        except RemoteUnavailable as exc:
            send = _Outcome(None, exc)
        receive = _outcome(await receive_task, self._classify_receive)
        transferred = sender.bytes_received
        side = blame(send, receive, first, send_aborted=self._send_aborted)
        if side is None and send.result is not None and receive.result is not None:
            elapsed = self._clock() - self._started
            return TransferResult(transferred, elapsed, send.result, receive.result)
        cause, other = (send, receive) if side == "send" else (receive, send)
        error = cause.error or ZbackupdError("transfer failed without an error")
        # The channel we closed ourselves is no second failure worth reporting.
        other_error = None if self._send_aborted and side == "receive" else other.error
        raise TransferFailed(
            side or "send", error, other=other_error, bytes_transferred=transferred
        ) from cause.error

    async def finish_unless_stalled(self, timeout: float) -> TransferResult:
        """``finish()``, unless the watchdog sees no byte move for ``timeout`` seconds
        first: then ``TransferStalled`` (``tear_down`` aborts the channel and the receive)."""
        finishing = asyncio.ensure_future(self.finish())
        watchdog = asyncio.ensure_future(self._watch_for_stall(timeout))
        try:
            await asyncio.wait({finishing, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (finishing, watchdog):
                task.cancel()
            await asyncio.wait({finishing, watchdog})
        if not finishing.cancelled():
            return finishing.result()  # done first: its result, or its TransferFailed
        if watchdog.cancelled():  # pragma: no cover -- one of the two finished
            raise RuntimeError("the transfer ended without an outcome")
        sender = self._sender
        raise TransferStalled(
            sender.argv if sender is not None else (),
            stalled_for=timeout,
            bytes_transferred=watchdog.result(),
        )

    async def _watch_for_stall(self, timeout: float) -> int:
        """Returns the byte count once it has not moved for ``timeout`` seconds while the
        send runs; never returns after the send ended (the whole stream is here)."""
        sender, send_task = self._sender, self._send_task
        if sender is None or send_task is None:
            raise RuntimeError("watching a transfer that did not start")
        seen, moved_at = sender.bytes_received, self._clock()
        poll = min(STALL_POLL_SECONDS, timeout / 4)
        while not send_task.done():
            await asyncio.sleep(poll)
            now, count = self._clock(), sender.bytes_received
            if count != seen:
                seen, moved_at = count, now
            elif now - moved_at >= timeout:
                return count
        await asyncio.Event().wait()  # cancelled by finish_unless_stalled
        raise AssertionError("unreachable")  # pragma: no cover

    async def _after_receive_exited(
        self,
        receive_result: CommandResult,
        sender: RemoteStream,
        send_task: asyncio.Task[CommandResult],
    ) -> None:
        # The child has the read end; drop ours so a still-writing sender sees EPIPE.
        self._close_read_end()
        if send_task.done():
            return
        if receive_result.returncode == 0:
            # A receiver that is done has read the whole stream: the send should end now.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(send_task), SENDER_GRACE_SECONDS)
        if not send_task.done():
            self._send_aborted = True
            sender.abort()

    def _close_read_end(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    async def tear_down(self) -> None:
        """Stop whatever still runs: receiver killed and reaped, channel closed, fds closed."""
        try:
            if self._receive_task is not None and not self._receive_task.done():
                self._receive_task.cancel()  # LocalRunner kills and reaps the child
            if self._sender is not None:
                if self._send_task is None or not self._send_task.done():
                    self._sender.abort()
                # Closing the channel also closes asyncssh's write end of the pipe. Only one
                # waiter may be inside asyncssh's wait_closed() (it awaits its cleanup
                # coroutines, which can be awaited once): the send task is that waiter.
                closing: asyncio.Future[object] = (
                    self._send_task
                    if self._send_task is not None
                    else asyncio.ensure_future(self._sender.wait_closed())
                )
                # asyncio.wait: the send's own outcome (an error too) is finish()'s to judge.
                await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_SECONDS)
                if not closing.done():
                    closing.cancel()
            # Reap both; their outcomes were taken already, or no longer matter after an error.
            await asyncio.gather(
                *(t for t in (self._receive_task, self._send_task) if t is not None),
                return_exceptions=True,
            )
            if self._progress_task is not None:
                self._progress_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._progress_task
        finally:
            self._close_read_end()
