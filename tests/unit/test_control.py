"""The control socket over a real Unix socket: status, unlock, refusals, file modes."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from zbackupd.errors import PermanentError
from zbackupd.keys.secret import SecretBytes
from zbackupd.service.control import ControlError, ControlServer, DaemonNotRunning, request


class Daemon:
    """Stands in for the daemon's handlers; records what the unlock handler saw."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.buffers: list[bytearray] = []
        self.reprs: list[str] = []

    async def status(self) -> dict[str, Any]:
        return {"state": "locked", "disks": []}

    async def unlock(self, passphrase: bytearray) -> dict[str, Any]:
        self.seen.append(bytes(passphrase))
        self.buffers.append(passphrase)
        self.reprs.append(f"{passphrase!r} {passphrase}")
        if passphrase != bytearray(b"correct horse"):
            raise PermanentError("wrong passphrase")
        return {"state": "idle"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Path, Daemon]]:
    daemon = Daemon()
    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, on_status=daemon.status, on_unlock=daemon.unlock)
    await server.start()
    yield path, daemon
    await server.close()


async def test_status_round_trip(served: tuple[Path, Daemon]) -> None:
    path, _ = served
    assert await request(path, "status") == {"state": "locked", "disks": []}


async def test_socket_and_directory_are_private(served: tuple[Path, Daemon]) -> None:
    path, _ = served
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_unlock_passes_raw_bytes_and_zeroes_them(served: tuple[Path, Daemon]) -> None:
    path, daemon = served
    assert await request(path, "unlock", secret=SecretBytes(b"correct horse")) == {"state": "idle"}
    assert daemon.seen == [b"correct horse"]
    assert daemon.buffers[0] == bytearray(len(b"correct horse"))  # zeroed after the handler


async def test_the_handler_gets_a_secret_that_never_shows_itself(
    served: tuple[Path, Daemon],
) -> None:
    """A traceback, a log line or a debugger printing the handler's argument shows no
    passphrase: it is a ``SecretBytes``, not a plain ``bytearray``."""
    path, daemon = served
    await request(path, "unlock", secret=SecretBytes(b"correct horse"))
    assert isinstance(daemon.buffers[0], SecretBytes)
    assert "correct" not in daemon.reprs[0]
    assert daemon.reprs[0] == "SecretBytes(<13 bytes redacted>) SecretBytes(<13 bytes redacted>)"


async def test_handler_refusal_is_reported(served: tuple[Path, Daemon]) -> None:
    path, _ = served
    with pytest.raises(ControlError, match="wrong passphrase"):
        await request(path, "unlock", secret=SecretBytes(b"nope"))


async def test_unknown_and_malformed_requests(served: tuple[Path, Daemon]) -> None:
    path, _ = served
    with pytest.raises(ControlError, match="unknown request 'format'"):
        await request(path, "format")
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"not json\n")
    await writer.drain()
    assert b"request is not JSON" in await reader.readline()
    writer.close()
    await writer.wait_closed()


async def test_unlock_without_a_length_is_refused(served: tuple[Path, Daemon]) -> None:
    path, daemon = served
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b'{"op": "unlock", "secret_length": 999999}\n')
    await writer.drain()
    assert b"unlock needs 1..4096 passphrase bytes" in await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert daemon.seen == []


async def test_other_users_are_refused(tmp_path: Path) -> None:
    daemon = Daemon()
    path = tmp_path / "c.sock"
    nobody = frozenset({os.getuid() + 4242})
    server = ControlServer(path, on_status=daemon.status, on_unlock=daemon.unlock,
                           allowed_uids=nobody)
    await server.start()
    try:
        with pytest.raises(ControlError, match="permission denied"):
            await request(path, "unlock", secret=SecretBytes(b"correct horse"))
        assert daemon.seen == []
    finally:
        await server.close()


async def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="zbackupd is not running"):
        await request(tmp_path / "absent.sock", "status")


# ------------------------------------------------------------- stopping with clients attached

#: A bound on close(): far below the unit's TimeoutStopSec, far above a healthy close.
CLOSE_BOUND = 5.0


async def test_close_returns_with_an_idle_client_connected(tmp_path: Path) -> None:
    """Python >= 3.12's ``Server.wait_closed`` waits for every connection: an idle client
    used to stall the daemon's stop until SIGKILL, before the key wipe ran."""
    daemon = Daemon()
    path = tmp_path / "c.sock"
    server = ControlServer(path, on_status=daemon.status, on_unlock=daemon.unlock)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await asyncio.sleep(0.05)  # the server has accepted it and waits for a header
        await asyncio.wait_for(server.close(), CLOSE_BOUND)
        assert await asyncio.wait_for(reader.read(), CLOSE_BOUND) == b""  # closed on it
        assert not path.exists()
    finally:
        writer.close()


async def test_a_silent_client_is_dropped_after_the_read_timeout(tmp_path: Path) -> None:
    daemon = Daemon()
    path = tmp_path / "c.sock"
    server = ControlServer(path, on_status=daemon.status, on_unlock=daemon.unlock,
                           read_timeout=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "sta')  # half a header, then nothing
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), CLOSE_BOUND)
        assert b"no complete request within 0.2s" in answer
        writer.close()
    finally:
        await server.close()


async def test_a_stalled_passphrase_is_dropped_and_never_reaches_the_handler(
    tmp_path: Path,
) -> None:
    daemon = Daemon()
    path = tmp_path / "c.sock"
    server = ControlServer(path, on_status=daemon.status, on_unlock=daemon.unlock,
                           read_timeout=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "unlock", "secret_length": 13}\ncorrect')  # 7 of 13 bytes
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), CLOSE_BOUND)
        assert b"no complete request" in answer
        assert daemon.seen == []
        writer.close()
    finally:
        await server.close()


async def test_close_cancels_an_unlock_in_progress_and_wipes_its_passphrase(
    tmp_path: Path,
) -> None:
    entered = asyncio.Event()
    handed: list[bytearray] = []
    cancelled: list[bool] = []

    async def slow_unlock(passphrase: bytearray) -> dict[str, Any]:
        handed.append(passphrase)
        entered.set()
        try:
            await asyncio.Event().wait()  # a KDF that never finishes
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return {}

    path = tmp_path / "c.sock"
    server = ControlServer(path, on_status=Daemon().status, on_unlock=slow_unlock)
    await server.start()
    client = asyncio.create_task(request(path, "unlock", secret=SecretBytes(b"correct horse")))
    try:
        await asyncio.wait_for(entered.wait(), CLOSE_BOUND)
        await asyncio.wait_for(server.close(), CLOSE_BOUND)
        assert cancelled == [True]
        assert handed[0] == bytearray(len(b"correct horse"))  # zeroed
        with pytest.raises(ControlError, match="closed the connection without answering"):
            await asyncio.wait_for(client, CLOSE_BOUND)
    finally:
        client.cancel()


async def test_plan_passes_the_label_and_answers_the_daemons_preview(tmp_path: Path) -> None:
    asked: list[str | None] = []

    async def plan(label: str | None) -> dict[str, Any]:
        asked.append(label)
        return {"disks": [{"label": label or "all"}]}

    path = tmp_path / "run" / "control.sock"
    daemon = Daemon()
    server = ControlServer(path, on_status=daemon.status, on_unlock=daemon.unlock, on_plan=plan)
    await server.start()
    try:
        assert await request(path, "plan", label="offsite-a") == {
            "disks": [{"label": "offsite-a"}]}
        assert await request(path, "plan") == {"disks": [{"label": "all"}]}
    finally:
        await server.close()
    assert asked == ["offsite-a", None]
