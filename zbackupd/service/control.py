"""The daemon's control socket: ``zbackupd status`` and ``zbackupd unlock`` talk through it.

A Unix stream socket, mode 0600 in a 0700 directory, and the peer's credentials
(``SO_PEERCRED``) are checked on every connection: only root (or the daemon's own user)
may ask. One request per connection: a JSON header line, then — for ``unlock`` only — the
passphrase as exactly ``secret_length`` raw bytes, read into a ``SecretBytes`` (a
``bytearray`` whose ``repr`` shows no content) the handler gets and the server zeroes.
The passphrase never travels inside JSON, so it is never a Python ``str``.

A client gets ``read_timeout`` seconds to send its whole request (and as long again to take
the answer); then it is answered with an error and dropped. ``close()`` stops accepting,
cancels the handlers still running (an unlock in progress: its passphrase is zeroed) and
aborts every connection, so it returns promptly even with idle clients attached (since
Python 3.12, ``asyncio.Server.wait_closed`` waits for every connection to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from zbackupd.errors import PermanentError, TransientError, ZbackupdError
from zbackupd.keys.secret import SecretBytes

MAX_HEADER_BYTES = 4096
MAX_SECRET_BYTES = 4096
#: How long a client may take to send its request, and to take the answer.
READ_TIMEOUT_SECONDS = 10.0
#: How long ``close()`` waits for cancelled handlers and aborted connections to end.
CLOSE_GRACE_SECONDS = 5.0

log = structlog.get_logger(__name__)

StatusHandler = Callable[[], Awaitable[dict[str, Any]]]
UnlockHandler = Callable[[SecretBytes], Awaitable[dict[str, Any]]]
#: ``plan``: the disk label (None: every disk) → what the next plug-ins would send.
PlanHandler = Callable[[str | None], Awaitable[dict[str, Any]]]


class ControlError(PermanentError):
    """The daemon answered a control request with an error."""


class DaemonNotRunning(TransientError):
    """Nobody listens on the control socket."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"zbackupd is not running (no answer on {path}: {reason})")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


class ControlServer:
    """Serves status and unlock requests; the handlers are the daemon's own methods."""

    def __init__(
        self,
        path: Path,
        *,
        on_status: StatusHandler,
        on_unlock: UnlockHandler,
        on_plan: PlanHandler | None = None,
        allowed_uids: frozenset[int] | None = None,
        read_timeout: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        self.path = path
        self._on_status = on_status
        self._on_unlock = on_unlock
        self._on_plan = on_plan
        self._allowed = allowed_uids if allowed_uids is not None else frozenset({0, os.getuid()})
        self._read_timeout = read_timeout
        self._server: asyncio.AbstractServer | None = None
        #: The running connection handlers and their streams, for ``close()``.
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop serving: no new connections, running handlers cancelled, clients dropped.

        Bounded by ``CLOSE_GRACE_SECONDS`` whatever the clients do.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        for writer in list(self._writers):
            writer.transport.abort()  # an idle or slow client: gone now, not after a flush
        if handlers:
            _, stuck = await asyncio.wait(handlers, timeout=CLOSE_GRACE_SECONDS)
            if stuck:
                log.error("control handlers did not end on close", stuck=len(stuck))
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), CLOSE_GRACE_SECONDS)
            except TimeoutError:
                log.error("control socket connections did not close in time")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            sock: socket.socket = writer.get_extra_info("socket")
            peer = peer_credentials(sock)
            if peer.uid not in self._allowed:
                log.warning("control request refused", peer_uid=peer.uid, peer_pid=peer.pid)
                response: dict[str, Any] = {"ok": False, "error": "permission denied: root only"}
            else:
                response = await self._dispatch(reader)
            async with asyncio.timeout(self._read_timeout):
                await _reply(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away; nothing to answer
        except TimeoutError:
            log.warning("control client did not take its answer in time; dropped")
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()  # flushes the answer; a client that does not read it is aborted
            try:
                async with asyncio.timeout(self._read_timeout):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError):
                writer.transport.abort()

    async def _dispatch(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            try:
                async with asyncio.timeout(self._read_timeout):
                    header = await _read_header(reader)
                    op = header.get("op")
                    secret = (
                        await _read_secret(reader, header.get("secret_length"))
                        if op == "unlock"
                        else None
                    )
            except TimeoutError:
                log.warning("control client sent no complete request in time; dropped",
                            timeout=self._read_timeout)
                raise ControlError(
                    f"no complete request within {self._read_timeout:g}s"
                ) from None
            if op == "status":
                return {"ok": True, "result": await self._on_status()}
            if op == "plan" and self._on_plan is not None:
                label = header.get("label")
                return {"ok": True, "result": await self._on_plan(
                    label if isinstance(label, str) else None)}
            if secret is not None:
                with secret:  # zeroed when the handler is done, whatever it did
                    return {"ok": True, "result": await self._on_unlock(secret)}
            raise ControlError(f"unknown request {op!r}")
        except ZbackupdError as error:
            return {"ok": False, "error": str(error), "transient": error.transient}


async def _read_header(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readuntil(b"\n")
    if len(line) > MAX_HEADER_BYTES:
        raise ControlError("request header too long")
    try:
        header = json.loads(line)
    except ValueError:
        raise ControlError("request is not JSON") from None
    if not isinstance(header, dict):
        raise ControlError("request is not a JSON object")
    return header


async def _read_secret(reader: asyncio.StreamReader, length: object) -> SecretBytes:
    """Read the passphrase straight into a mutable buffer the caller zeroes."""
    if not isinstance(length, int) or not 0 < length <= MAX_SECRET_BYTES:
        raise ControlError(f"unlock needs 1..{MAX_SECRET_BYTES} passphrase bytes")
    secret = SecretBytes(length)
    try:
        await _read_into(reader, secret)
    except BaseException:  # EOF, the read timeout, cancellation: no partial passphrase stays
        secret.wipe()
        raise
    return secret


async def _read_into(reader: asyncio.StreamReader, buffer: bytearray) -> None:
    """Fill ``buffer`` exactly from ``reader``; ``IncompleteReadError`` at an early EOF."""
    view = memoryview(buffer)
    try:
        filled = 0
        while filled < len(view):
            chunk = await reader.read(len(view) - filled)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", len(view))
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    finally:
        view.release()


async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    writer.write(json.dumps(response, sort_keys=True).encode("utf-8") + b"\n")
    await writer.drain()


async def request(
    path: Path,
    op: str,
    *,
    secret: SecretBytes | None = None,
    timeout: float = 120.0,
    label: str | None = None,
) -> dict[str, Any]:
    """Send one request and return the daemon's ``result``; raise ``ControlError`` on refusal."""
    header: dict[str, Any] = {"op": op}
    if label is not None:
        header["label"] = label
    if secret is not None:
        header["secret_length"] = len(secret)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(json.dumps(header).encode("utf-8") + b"\n")
                if secret is not None:
                    writer.write(memoryview(secret))
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except (FileNotFoundError, ConnectionRefusedError) as error:
        raise DaemonNotRunning(path, error.strerror or str(error)) from error
    except TimeoutError:
        raise DaemonNotRunning(path, f"no answer within {timeout:g}s") from None
    if not line:
        raise ControlError("the daemon closed the connection without answering")
    response = json.loads(line)
    if not response.get("ok"):
        raise ControlError(str(response.get("error", "unknown error")))
    result: dict[str, Any] = response.get("result", {})
    return result
