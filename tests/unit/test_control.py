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
from zbackupd.service.control import ControlError, ControlServer, DaemonNotRunning, request


class Daemon:
    """Stands in for the daemon's handlers; records what the unlock handler saw."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.buffers: list[bytearray] = []

    async def status(self) -> dict[str, Any]:
        return {"state": "locked", "disks": []}

    async def unlock(self, passphrase: bytearray) -> dict[str, Any]:
        self.seen.append(bytes(passphrase))
        self.buffers.append(passphrase)
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
    assert await request(path, "unlock", secret=bytearray(b"correct horse")) == {"state": "idle"}
    assert daemon.seen == [b"correct horse"]
    assert daemon.buffers[0] == bytearray(len(b"correct horse"))  # zeroed after the handler


async def test_handler_refusal_is_reported(served: tuple[Path, Daemon]) -> None:
    path, _ = served
    with pytest.raises(ControlError, match="wrong passphrase"):
        await request(path, "unlock", secret=bytearray(b"nope"))


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
            await request(path, "unlock", secret=bytearray(b"correct horse"))
        assert daemon.seen == []
    finally:
        await server.close()


async def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="zbackupd is not running"):
        await request(tmp_path / "absent.sock", "status")
