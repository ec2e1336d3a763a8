"""SSH servers for integration tests, no root needed.

Two kinds, each a pytest fixture (import the fixture name into the test module):

- ``fake_server``: an in-process asyncssh server on 127.0.0.1 whose process handler
  emulates just enough of the server side (``zfs send`` writes N pseudo-random bytes and
  records their SHA-256; ``echo-argv`` returns the argv it parsed; ``fail`` exits 1).
- ``openssh_server``: a REAL OpenSSH ``sshd -D`` on a free loopback port with its own host
  key, ``authorized_keys`` and config, run as the current user. Missing ``sshd`` is a
  failure, not a skip: install ``openssh-server`` (``make host-deps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import random
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

from zbackupd.server.remote import SshTarget

SSHD = "/usr/sbin/sshd"
CHUNK = 256 * 1024


@dataclass
class SentStream:
    """What the fake server sent for one ``zfs send``: the facts a test checks against."""

    argv: tuple[str, ...]
    size: int
    sha256: str = ""
    bytes_written: int = 0
    finished: bool = False


@dataclass
class FakeServerState:
    """Knobs and records of the in-process server, shared with the test."""

    send_size: int = 1024 * 1024
    #: Sleep this long between chunks, to make a transfer last (progress, cancellation).
    chunk_delay: float = 0.0
    #: ``zfs send`` exits with this status after writing its bytes (0 = success).
    send_exit_status: int = 0
    send_stderr: str = ""
    #: Abort the whole connection once this many bytes were written (a pulled cable).
    drop_after_bytes: int | None = None
    #: Stop writing once this many bytes were written, the connection still answering (a
    #: ``zfs send`` hung on the server): until ``released`` is set.
    hang_after_bytes: int | None = None
    #: Go silent once this many bytes were written: nothing written, nothing read, not
    #: even keepalives answered (a cut cable, as the client sees it): until ``released``.
    freeze_after_bytes: int | None = None
    #: Set when the fixture ends: hung and frozen senders give up then.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    sent: list[SentStream] = field(default_factory=list)
    open_processes: int = 0


async def _emulate_send(process: asyncssh.SSHServerProcess[bytes], state: FakeServerState) -> int:
    stream = SentStream(tuple(shlex.split(process.command or "")), state.send_size)
    state.sent.append(stream)
    digest = hashlib.sha256()
    rng = random.Random(state.send_size)  # noqa: S311 -- test payload, not a secret
    remaining = state.send_size
    try:
        while remaining:
            chunk = rng.randbytes(min(CHUNK, remaining))
            process.stdout.write(chunk)
            await process.stdout.drain()
            digest.update(chunk)
            remaining -= len(chunk)
            stream.bytes_written += len(chunk)
            if (
                state.drop_after_bytes is not None
                and stream.bytes_written >= state.drop_after_bytes
            ):
                process.get_extra_info("connection").abort()
                return 141
            if await _stop_here(process, state, stream.bytes_written):
                return 141
            if state.chunk_delay:
                await asyncio.sleep(state.chunk_delay)
    except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
        return 130
    except (BrokenPipeError, ConnectionError, asyncssh.DisconnectError):
        return 141
    stream.sha256 = digest.hexdigest()
    stream.finished = True
    if state.send_stderr:
        process.stderr.write(state.send_stderr.encode())
    return state.send_exit_status


async def _stop_here(
    process: asyncssh.SSHServerProcess[bytes], state: FakeServerState, written: int
) -> bool:
    """Hang or freeze (see ``FakeServerState``) once ``written`` reaches the knob."""
    if state.hang_after_bytes is not None and written >= state.hang_after_bytes:
        await state.released.wait()
        return True
    if state.freeze_after_bytes is not None and written >= state.freeze_after_bytes:
        connection = process.get_extra_info("connection")
        # asyncssh has no public way to stop reading: its transport is the cable to cut.
        connection._transport.pause_reading()
        await state.released.wait()
        connection.abort()
        return True
    return False


async def _handle(process: asyncssh.SSHServerProcess[bytes], state: FakeServerState) -> None:
    argv = tuple(shlex.split(process.command or ""))
    state.commands.append(argv)
    state.open_processes += 1
    status = 0
    try:
        if argv[:2] == ("zfs", "send"):
            status = await _emulate_send(process, state)
        elif argv[:1] == ("echo-argv",):
            process.stdout.write(json.dumps(list(argv[1:])).encode())
        elif argv[:1] == ("fail",):
            process.stderr.write(" ".join(argv[1:]).encode() + b"\n")
            status = 1
        elif argv[:1] == ("drop",):
            # Vanish without a goodbye, as a pulled cable would (seen as a dropped link).
            process.get_extra_info("connection").abort()
            return
        elif argv[:1] == ("sleep",):
            await asyncio.sleep(float(argv[1]))
        else:
            process.stderr.write(f"fake server: unknown command {argv!r}\n".encode())
            status = 127
    finally:
        state.open_processes -= 1
    process.exit(status)


@dataclass
class FakeServer:
    """A running in-process server and the keys a client needs to reach it."""

    port: int
    host_key: asyncssh.SSHKey
    client_key: asyncssh.SSHKey
    state: FakeServerState
    server: asyncssh.SSHAcceptor

    def target(self, **overrides: object) -> SshTarget:
        settings: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "zbackupd",
            "host_key": self.host_key.export_public_key().decode(),
            "connect_timeout": 10.0,
        }
        settings.update(overrides)
        return SshTarget(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    """An asyncssh server on a free loopback port that accepts only the test's client key."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    state = FakeServerState()

    async def handler(process: asyncssh.SSHServerProcess[bytes]) -> None:
        await _handle(process, state)

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        process_factory=handler,
        encoding=None,
        allow_scp=False,
        sftp_factory=None,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield FakeServer(port, host_key, client_key, state, server)
    finally:
        state.released.set()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------------------
# A real OpenSSH sshd on loopback


@dataclass
class OpenSshServer:
    """A running ``sshd -D`` and what a client (asyncssh or ``ssh``) needs to use it."""

    port: int
    username: str
    host_key_line: str
    host_key_path: Path
    client_key: asyncssh.SSHKey
    client_key_path: Path
    directory: Path
    process: subprocess.Popen[bytes]

    def target(self, **overrides: object) -> SshTarget:
        settings: dict[str, object] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.username,
            "host_key": self.host_key_line,
            "connect_timeout": 10.0,
        }
        settings.update(overrides)
        return SshTarget(**settings)  # type: ignore[arg-type]

    def ssh_argv(self, *remote: str) -> list[str]:
        """An OpenSSH client command line for the same server (benchmarks, comparisons)."""
        known_hosts = self.directory / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_key_line}\n")
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.client_key_path),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "Ciphers=aes128-gcm@openssh.com",
            "-o",
            "Compression=no",
            f"{self.username}@127.0.0.1",
            *remote,
        ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited {proc.returncode} at start:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    pytest.fail(f"sshd did not listen on 127.0.0.1:{port} within {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def run_openssh_server(
    directory: Path,
    *,
    authorized_key_options: str = "",
    extra_config: Sequence[str] = (),
) -> Iterator[OpenSshServer]:
    """Start ``sshd -D`` with everything under ``directory``; stop it on exit.

    ``authorized_key_options`` prefixes the client key's line (``restrict,command="…"``);
    ``extra_config`` adds sshd_config lines (``SetEnv PATH=…`` for a stub ``zfs``).
    """
    sshd = shutil.which("sshd") or (SSHD if os.path.exists(SSHD) else None)
    if sshd is None:
        pytest.fail("sshd not found: install openssh-server (make host-deps)")
    ssh_keygen = shutil.which("ssh-keygen")
    if ssh_keygen is None:
        pytest.fail("ssh-keygen not found: install openssh-client (make host-deps)")
    if os.geteuid() == 0:
        # sshd started by root insists on its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    host_key_path = directory / "ssh_host_ed25519_key"
    subprocess.run(
        [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", "test-host", "-f", str(host_key_path)],
        check=True,
    )
    host_key_line = host_key_path.with_suffix(".pub").read_text().strip()
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key_path = directory / "client_key"
    client_key.write_private_key(str(client_key_path))
    client_key_path.chmod(0o600)
    public = client_key.export_public_key().decode().strip()
    authorized_keys = directory / "authorized_keys"
    prefix = f"{authorized_key_options} " if authorized_key_options else ""
    authorized_keys.write_text(f"{prefix}{public}\n")
    username = pwd.getpwuid(os.geteuid()).pw_name
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key_path}",
                f"AuthorizedKeysFile {authorized_keys}",
                f"PidFile {directory / 'sshd.pid'}",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "HostbasedAuthentication no",
                "AllowAgentForwarding no",
                "AllowTcpForwarding no",
                "X11Forwarding no",
                "PrintMotd no",
                "LogLevel VERBOSE",
                *extra_config,
                "",
            ]
        )
    )
    log = directory / "sshd.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        _wait_listening(proc, port, log, timeout=10.0)
        yield OpenSshServer(
            port=port,
            username=username,
            host_key_line=host_key_line,
            host_key_path=host_key_path,
            client_key=client_key,
            client_key_path=client_key_path,
            directory=directory,
            process=proc,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def openssh_server(tmp_path: Path) -> Iterator[OpenSshServer]:
    """A real OpenSSH sshd on loopback accepting the test's key, no forced command."""
    with run_openssh_server(tmp_path / "sshd") as server:
        yield server
