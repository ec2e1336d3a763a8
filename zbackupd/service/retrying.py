"""What the session needs to retry a source after a transient failure (issue 12).

``TransferWatch`` is the streamer the session hands each ``DatasetReplication``: the
real ``transfer.stream`` with the configured stall timeout, remembering the transient
failure that ended a transfer (a dataset reports its failure as a sentence; the session
needs the error to decide on a retry). ``SourceInterrupted`` ends a source's attempt
when such a failure hit one of its datasets; ``PendingRetry`` is a source waiting for its
next attempt and ``wait_until`` the wait itself, on the injected clock and sleep, with
the status line counting down. The decisions (window, backoff) are ``core/retry.py``'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from zbackupd.config import DaemonSettings, Source
from zbackupd.core.retry import RetryPolicy
from zbackupd.errors import TransientError, ZbackupdError
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import (
    ProgressCallback,
    TransferFailed,
    TransferResult,
    TransferStalled,
)
from zbackupd.zfs.runner import Runner

#: While waiting to retry, the status line's "in N s" is refreshed this often.
STATUS_REFRESH_SECONDS = 10.0


class StallStreamer(Protocol):
    """``transfer.stream``'s signature, stall timeout included (a constructor seam)."""

    async def __call__(
        self,
        remote: RemoteHost,
        send_argv: Sequence[str],
        runner: Runner,
        receive_argv: Sequence[str],
        *,
        estimated_total: int | None = None,
        on_progress: ProgressCallback | None = None,
        stall_timeout: float | None = None,
    ) -> TransferResult: ...


class TransferWatch:
    """Streams with the stall timeout; ``failure`` is the last transient error a transfer
    of the current attempt ended with (``reset`` before each attempt)."""

    def __init__(self, streamer: StallStreamer, stall_timeout: float) -> None:
        self._streamer = streamer
        self.stall_timeout = stall_timeout
        self.failure: ZbackupdError | None = None

    def reset(self) -> None:
        self.failure = None

    async def __call__(
        self,
        remote: RemoteHost,
        send_argv: Sequence[str],
        runner: Runner,
        receive_argv: Sequence[str],
        *,
        estimated_total: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TransferResult:
        try:
            return await self._streamer(
                remote, send_argv, runner, receive_argv, estimated_total=estimated_total,
                on_progress=on_progress, stall_timeout=self.stall_timeout,
            )
        except ZbackupdError as error:
            if error.transient:
                self.failure = error
            raise


class SourceInterrupted(TransientError):
    """A dataset of the source failed transiently (link cut, stall, busy): the source's
    attempt ends there; the next one plans afresh (an interrupted receive resumes)."""

    def __init__(self, source: str, problem: str, cause: ZbackupdError) -> None:
        self.source = source
        self.problem = problem
        self.cause = cause
        self.bytes_transferred: int | None = (
            cause.bytes_transferred if isinstance(cause, TransferFailed | TransferStalled)
            else None
        )
        super().__init__(problem)


@dataclass(frozen=True, slots=True)
class PendingRetry:
    """A source that failed transiently ``failures`` times, tried again at ``due``."""

    source: Source
    failures: int
    first_failure: float
    due: float
    error: ZbackupdError


def retry_policy(settings: DaemonSettings) -> RetryPolicy:
    return RetryPolicy(
        float(settings.retry_window_seconds),
        tuple(float(delay) for delay in settings.retry_backoff_seconds),
    )


async def wait_until(
    due: float,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    show: Callable[[float], None],
) -> None:
    """Sleep until ``due`` on ``clock``, calling ``show(seconds_left)`` first and then at
    least every ``STATUS_REFRESH_SECONDS``."""
    while (left := due - clock()) > 0:
        show(left)
        await sleep(min(left, STATUS_REFRESH_SECONDS))
