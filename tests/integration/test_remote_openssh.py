"""The remote layer and the streaming transfer through a REAL OpenSSH sshd on loopback."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import asyncssh
import pytest

from tests.integration.sshd import OpenSshServer, openssh_server, run_openssh_server
from zbackupd.errors import CommandError
from zbackupd.server.remote import HostKeyRejected, connect
from zbackupd.server.transfer import TransferFailed, stream
from zbackupd.zfs.runner import LocalRunner

__all__ = ["openssh_server"]  # the fixture, imported for pytest

MiB = 1024 * 1024
SHA256_OF_STDIN = (
    "import hashlib, sys\n"
    "digest = hashlib.sha256()\n"
    "while chunk := sys.stdin.buffer.read(1 << 20): digest.update(chunk)\n"
    "print(digest.hexdigest())\n"
)


async def test_runs_a_command_through_the_remote_shell_with_words_intact(
    openssh_server: OpenSshServer,
) -> None:
    words = ["a b", "$(id)", "'quoted'", '"double"', "*", "x;y", ""]
    async with await connect(openssh_server.target(), openssh_server.client_key) as remote:
        result = await remote.run(["printf", r"[%s]\n", *words])
        assert remote.negotiated_cipher == "aes128-gcm@openssh.com"
    assert result.text == "".join(f"[{word}]\n" for word in words)


async def test_remote_failure_carries_exit_status_and_stderr(
    openssh_server: OpenSshServer,
) -> None:
    async with await connect(openssh_server.target(), openssh_server.client_key) as remote:
        with pytest.raises(CommandError) as caught:
            await remote.run(["sh", "-c", "echo 'dataset does not exist' >&2; exit 2"])
    assert caught.value.returncode == 2
    assert caught.value.stderr == "dataset does not exist\n"


async def test_real_sshd_with_another_host_key_is_rejected(openssh_server: OpenSshServer) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    with pytest.raises(HostKeyRejected) as caught:
        await connect(openssh_server.target(host_key=impostor), openssh_server.client_key)
    real = asyncssh.import_public_key(openssh_server.host_key_line)
    assert caught.value.offered_fingerprint == real.get_fingerprint()


async def test_streams_through_real_sshd_intact(
    openssh_server: OpenSshServer, tmp_path: Path
) -> None:
    size = 32 * MiB
    sent_copy = tmp_path / "sent.bin"
    send_argv = [
        "sh",
        "-c",
        'head -c "$1" /dev/urandom | tee "$2"',
        "sh",
        str(size),
        str(sent_copy),
    ]
    async with await connect(openssh_server.target(), openssh_server.client_key) as remote:
        result = await stream(
            remote, send_argv, LocalRunner(), [sys.executable, "-c", SHA256_OF_STDIN]
        )
    assert result.bytes_transferred == size
    assert sent_copy.stat().st_size == size
    assert result.receive.text.strip() == hashlib.sha256(sent_copy.read_bytes()).hexdigest()


async def test_real_remote_send_failure_is_blamed_on_the_send(
    openssh_server: OpenSshServer,
) -> None:
    send_argv = ["sh", "-c", "echo \"cannot open 'pool/x@s': dataset does not exist\" >&2; exit 1"]
    async with await connect(openssh_server.target(), openssh_server.client_key) as remote:
        with pytest.raises(TransferFailed) as caught:
            await stream(remote, send_argv, LocalRunner(), ["cat"])
    assert caught.value.side == "send"
    assert isinstance(caught.value.cause, CommandError)
    assert "dataset does not exist" in caught.value.cause.stderr


async def test_forced_command_sees_our_command_line_and_a_stub_on_path(tmp_path: Path) -> None:
    """What the gate tests build on: a forced command, and a stub ``zfs`` found on PATH."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub = stubs / "zfs"
    stub.write_text('#!/bin/sh\necho "stub zfs $*"\n')
    stub.chmod(0o755)
    gate = tmp_path / "gate"
    # Splits SSH_ORIGINAL_COMMAND the way zbackupd-gate will, then runs it as argv.
    gate.write_text(
        f"#!{sys.executable}\n"
        "import os, shlex, subprocess, sys\n"
        "argv = shlex.split(os.environ['SSH_ORIGINAL_COMMAND'])\n"
        "print(repr(argv), flush=True)\n"
        "sys.exit(subprocess.run(argv).returncode)\n"
    )
    gate.chmod(0o755)
    with run_openssh_server(
        tmp_path / "sshd",
        authorized_key_options=f'restrict,command="{gate}"',
        extra_config=[f"SetEnv PATH={stubs}:/usr/bin:/bin"],
    ) as server:
        async with await connect(server.target(), server.client_key) as remote:
            result = await remote.run(["zfs", "list", "-H", "pool/a b"])
    assert result.text.splitlines() == [
        repr(["zfs", "list", "-H", "pool/a b"]),
        "stub zfs list -H pool/a b",
    ]
