"""The only module that spawns local processes.

Everything is argv: no shell ever interprets anything. Secrets reach a child only
through its stdin (``stdin_secret``), never argv or the environment, and the child
never inherits ``NOTIFY_SOCKET`` (it must not speak to systemd in our name).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from zbackupd.errors import CommandError, TransientError

#: Variables a child must never see: systemd's sockets are ours alone.
_SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID")
#: How long to wait for a killed child to exit. A zfs command stuck in the kernel (D state,
#: e.g. on a pool whose disk was pulled) ignores SIGKILL until its I/O completes: waiting
#: for it would turn every timeout and every cancellation into a hang of the caller.
#: After this the child is left to the loop's child watcher, which reaps it when it exits.
KILL_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


class CommandTimeout(TransientError):
    """A command did not finish in time and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        super().__init__(f"{self.argv[0]} did not finish within {timeout:g}s and was killed")


class Runner(Protocol):
    """Runs one argv to completion. The seam every test substitutes."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin_secret: bytearray | None = None,
        stdin_fd: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run ``argv``; raise ``CommandError`` on a non-zero exit when ``check``.

        ``stdin_secret`` is written to the child's stdin and then closed (EOF);
        ``stdin_fd`` hands the child an open descriptor as stdin (a pipe from the
        network stream into ``zfs receive``). At most one of them may be given.
        """
        ...


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for children: ours minus systemd's notification sockets, C locale."""
    source = os.environ if base is None else base
    env = {key: value for key, value in source.items() if key not in _SCRUBBED_ENV}
    env["LC_ALL"] = "C"  # parsers rely on untranslated messages
    return env


class LocalRunner:
    """Runs commands on this machine with ``asyncio.create_subprocess_exec``."""

    def __init__(self, *, default_timeout: float | None = None) -> None:
        self._default_timeout = default_timeout

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin_secret: bytearray | None = None,
        stdin_fd: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        if stdin_secret is not None and stdin_fd is not None:
            raise ValueError("give stdin_secret or stdin_fd, not both")
        argv = tuple(argv)
        stdin: int
        if stdin_secret is not None:
            stdin = asyncio.subprocess.PIPE
        elif stdin_fd is not None:
            stdin = stdin_fd
        else:
            stdin = asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_environment(),
            start_new_session=True,  # a Ctrl-C on our terminal is ours to handle, not zfs's
        )
        limit = timeout if timeout is not None else self._default_timeout
        try:
            async with asyncio.timeout(limit):
                if stdin_secret is not None:
                    await _feed_secret(proc, stdin_secret)
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            await _kill(proc)
            raise CommandTimeout(argv, limit or 0.0) from None
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        assert proc.returncode is not None  # noqa: S101 -- communicate() waited for exit
        result = CommandResult(argv, proc.returncode, stdout, stderr.decode("utf-8", "replace"))
        if check and result.returncode != 0:
            raise CommandError(argv, result.returncode, result.stderr)
        return result


async def run_with_input(
    argv: Sequence[str],
    *,
    stdin_data: bytes,
    extra_env: Mapping[str, str],
    timeout: float,
) -> CommandResult:
    """Run a program the admin configured (an alert hook): ``stdin_data`` on its stdin,
    ``extra_env`` added to the scrubbed environment, killed after ``timeout``. Never
    raises for a non-zero exit: the caller reports it."""
    argv = tuple(argv)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**child_environment(), **extra_env},
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate(stdin_data)
    except TimeoutError:
        await _kill(proc)
        raise CommandTimeout(argv, timeout) from None
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    assert proc.returncode is not None  # noqa: S101 -- communicate() waited for exit
    return CommandResult(argv, proc.returncode, stdout, stderr.decode("utf-8", "replace"))


async def _feed_secret(proc: asyncio.subprocess.Process, secret: bytearray) -> None:
    """Write the secret from its mutable buffer, then EOF; the caller zeroes the buffer."""
    assert proc.stdin is not None  # noqa: S101 -- stdin=PIPE was requested
    try:
        proc.stdin.write(memoryview(secret))
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child exited early; its exit code and stderr tell why
    finally:
        proc.stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.wait_closed()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL and wait briefly: a child in uninterruptible sleep cannot die before its I/O."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_WAIT_SECONDS)
