"""The SSH remote layer against a real in-process asyncssh server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.integration.sshd import FakeServer, fake_server
from zbackupd.errors import CommandError, TransientError
from zbackupd.server.remote import (
    AuthenticationRejected,
    HostKeyRejected,
    InvalidHostKey,
    RemoteCommandTimeout,
    RemoteUnavailable,
    SshTarget,
    connect,
    remote_command,
)
from zbackupd.zfs.parse import DatasetNotFound
from zbackupd.zfs.runner import CommandTimeout

REPO = Path(__file__).resolve().parents[2]

__all__ = ["fake_server"]  # the fixture, imported for pytest

NASTY_WORDS = ["a b", "$(touch /tmp/pwned)", "'", '"', "", "*", "x;y", "`id`", "tab\there", "ü"]


@given(st.lists(st.text(st.characters(blacklist_characters="\0\n")), min_size=1))
def test_remote_command_splits_back_to_the_same_argv(words: list[str]) -> None:
    assert shlex.split(remote_command(words)) == words


@pytest.mark.parametrize("bad", [[], ["zfs", "a\nb"], ["zfs", "a\0b"]])
def test_remote_command_refuses_what_a_command_line_cannot_carry(bad: Sequence[str]) -> None:
    with pytest.raises(ValueError, match="remote"):
        remote_command(bad)


async def test_runs_a_command_and_the_server_sees_exactly_our_argv(fake_server: FakeServer) -> None:
    async with await connect(fake_server.target(), fake_server.client_key) as remote:
        result = await remote.run(["echo-argv", *NASTY_WORDS])
    assert result.returncode == 0
    assert json.loads(result.stdout) == NASTY_WORDS
    assert fake_server.state.commands == [("echo-argv", *NASTY_WORDS)]


async def test_failed_command_is_classified(fake_server: FakeServer) -> None:
    class DatasetMissing(CommandError):
        pass

    seen: list[tuple[tuple[str, ...], int, str]] = []

    def classify(argv: Sequence[str], returncode: int, stderr: str) -> CommandError:
        seen.append((tuple(argv), returncode, stderr))
        return DatasetMissing(argv, returncode, stderr, transient=False)

    async with await connect(
        fake_server.target(), fake_server.client_key, classify=classify
    ) as remote:
        with pytest.raises(DatasetMissing) as caught:
            await remote.run(["fail", "dataset", "does", "not", "exist"])
        unchecked = await remote.run(["fail", "quietly"], check=False)
    assert caught.value.returncode == 1
    assert caught.value.stderr == "dataset does not exist\n"
    assert seen == [(("fail", "dataset", "does", "not", "exist"), 1, "dataset does not exist\n")]
    assert unchecked.returncode == 1
    assert unchecked.stderr == "quietly\n"


async def test_default_classification_is_a_permanent_command_error(
    fake_server: FakeServer,
) -> None:
    async with await connect(fake_server.target(), fake_server.client_key) as remote:
        with pytest.raises(CommandError) as caught:
            await remote.run(["fail", "boom"])
    assert type(caught.value) is CommandError
    assert caught.value.transient is False
    assert caught.value.argv == ("fail", "boom")


async def test_wrong_host_key_is_rejected_naming_both_fingerprints(
    fake_server: FakeServer,
) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519")
    target = fake_server.target(host_key=impostor.export_public_key().decode())
    with pytest.raises(HostKeyRejected) as caught:
        await connect(target, fake_server.client_key)
    error = caught.value
    assert error.transient is False
    assert error.expected_fingerprint == impostor.get_fingerprint()
    assert error.offered_fingerprint == fake_server.host_key.get_fingerprint()
    assert error.host == "127.0.0.1"
    assert error.port == fake_server.port
    assert error.offered_fingerprint in str(error)
    assert fake_server.state.commands == []


async def test_pinned_key_of_another_type_is_rejected(fake_server: FakeServer) -> None:
    other_type = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    target = fake_server.target(host_key=other_type.export_public_key().decode())
    with pytest.raises(HostKeyRejected) as caught:
        await connect(target, fake_server.client_key)
    assert caught.value.expected_fingerprint == other_type.get_fingerprint()


async def test_garbage_host_key_is_a_permanent_config_error(fake_server: FakeServer) -> None:
    with pytest.raises(InvalidHostKey):
        await connect(fake_server.target(host_key="ssh-ed25519 not-base64"), fake_server.client_key)


async def test_unknown_client_key_is_refused(fake_server: FakeServer) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(AuthenticationRejected) as caught:
        await connect(fake_server.target(), stranger)
    assert caught.value.transient is False
    assert caught.value.username == "zbackupd"


async def test_nothing_listening_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        target = SshTarget(
            host="127.0.0.1", port=port, user="u", host_key=_any_host_key(), connect_timeout=5
        )
        with pytest.raises(RemoteUnavailable) as caught:
            await connect(target, asyncssh.generate_private_key("ssh-ed25519"))
    assert isinstance(caught.value, TransientError)
    assert caught.value.port == port


async def test_dropped_connection_during_a_command_is_transient(fake_server: FakeServer) -> None:
    remote = await connect(fake_server.target(), fake_server.client_key)
    try:
        with pytest.raises(RemoteUnavailable) as caught:
            await remote.run(["drop"])
    finally:
        remote.close()
        await remote.wait_closed()
    assert caught.value.transient is True


async def test_command_timeout_is_transient_and_the_channel_is_closed(
    fake_server: FakeServer,
) -> None:
    async with await connect(fake_server.target(), fake_server.client_key) as remote:
        with pytest.raises(CommandTimeout) as caught:
            await remote.run(["sleep", "30"], timeout=0.3)
        # The connection stays usable after a timed-out command.
        again = await remote.run(["echo-argv", "still", "here"])
    assert caught.value.transient is True
    assert json.loads(again.stdout) == ["still", "here"]


async def test_every_command_is_bounded_by_the_targets_command_timeout(
    fake_server: FakeServer,
) -> None:
    """No caller passes a timeout: a hung server-side command still ends, as a typed
    transient error naming the server, and the link is not counted as lost."""
    target = fake_server.target(command_timeout=0.3)
    async with await connect(target, fake_server.client_key) as remote:
        with pytest.raises(RemoteCommandTimeout) as caught:
            await asyncio.wait_for(remote.run(["sleep", "30"]), 5)
        assert remote.link_failure is None
    error = caught.value
    assert error.transient is True
    assert (error.host, error.port, error.timeout) == ("127.0.0.1", fake_server.port, 0.3)
    assert "did not finish within 0.3s" in str(error)


async def test_a_dropped_link_is_remembered_by_the_connection(fake_server: FakeServer) -> None:
    remote = await connect(fake_server.target(), fake_server.client_key)
    try:
        assert remote.link_failure is None
        with pytest.raises(RemoteUnavailable) as caught:
            await remote.run(["drop"])
        assert remote.link_failure is caught.value
    finally:
        remote.close()
        await remote.wait_closed()


def test_the_target_takes_keepalives_from_the_source_and_the_command_timeout() -> None:
    class Source:
        host, port, user, host_key = "nas", 2222, "zbackupd", _any_host_key()
        ciphers = ("aes128-gcm@openssh.com",)
        window_bytes = 1 << 20
        keepalive_interval = 5.0
        keepalive_count_max = 3

    target = SshTarget.from_source(Source(), command_timeout=120.0)
    assert (target.keepalive_interval, target.keepalive_count_max) == (5.0, 3)
    assert target.command_timeout == 120.0
    assert SshTarget("h", "u", "k").command_timeout == 300.0


async def test_negotiates_aes_gcm_first(fake_server: FakeServer) -> None:
    remote = await connect(fake_server.target(), fake_server.client_key)
    try:
        assert remote.negotiated_cipher == "aes128-gcm@openssh.com"
    finally:
        remote.close()
        await remote.wait_closed()


def _any_host_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()


async def test_remote_stderr_is_classified_by_the_zfs_parser_by_default(
    fake_server: FakeServer,
) -> None:
    async with await connect(fake_server.target(), fake_server.client_key) as remote:
        with pytest.raises(DatasetNotFound) as caught:
            await remote.run(["fail", "cannot open 'pool/x': dataset does not exist"])
    assert caught.value.argv == ("fail", "cannot open 'pool/x': dataset does not exist")


# -- no file of the home directory is ever looked at -------------------------------------

_OPTIONS_PROBE = """
import asyncssh, sys
from zbackupd.server.remote import SshTarget, client_options
key = asyncssh.generate_private_key("ssh-ed25519")
target = SshTarget(host="192.0.2.1", user="z",
                   host_key=key.export_public_key().decode().strip())
client_options(target, key)
print("options built")
"""


def test_connecting_reads_nothing_from_an_unreadable_home(tmp_path: Path) -> None:
    """Under the hardened unit (ProtectHome=yes, no CAP_DAC_OVERRIDE) the home directory
    is unreadable: asyncssh's defaults (``~/.ssh/crt``, ``~/.ssh/ca-bundle.crt``,
    ``~/.ssh/config``) must not be consulted, or every connection fails with EACCES (seen
    in the VM). Here: root without the DAC capabilities, HOME another user's 0700 dir."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, 65534)
    completed = subprocess.run(
        ["/usr/bin/setpriv", "--bounding-set=-dac_override,-dac_read_search",
         sys.executable, "-c", _OPTIONS_PROBE],
        env={"HOME": str(home), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "options built"
