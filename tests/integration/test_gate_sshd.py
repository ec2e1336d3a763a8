"""zbackupd-gate as the forced command of a REAL OpenSSH sshd, driven by the daemon's own
remote layer: what the daemon does passes through it, anything else is refused on the
same connection and never reaches zfs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.sshd import OpenSshServer, run_openssh_server
from tests.integration.stub_zfs import SEND_SIZE, StubZfs, install_stub_zfs, send_payload
from zbackupd.core.model import Encryption
from zbackupd.errors import CommandError
from zbackupd.server import gate
from zbackupd.server.remote import connect
from zbackupd.server.transfer import stream
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import parse
from zbackupd.zfs.runner import LocalRunner

ROOT = "tank/data"
SECURE = "tank/data/secure"
SNAP = f"{ROOT}@zbackupd_20250101T000000Z"
SNAP2 = f"{ROOT}@zbackupd_20250102T000000Z"
MARK = f"{ROOT}#zbackupd_disk1"
SHA256_OF_STDIN = (
    "import hashlib, sys\n"
    "digest = hashlib.sha256()\n"
    "while chunk := sys.stdin.buffer.read(1 << 20): digest.update(chunk)\n"
    "print(digest.hexdigest())\n"
)


@dataclass(frozen=True)
class GatedServer:
    sshd: OpenSshServer
    zfs: StubZfs
    config: Path


def gate_command() -> Path:
    """The installed console script, as an admin would name it in authorized_keys."""
    script = Path(sys.executable).with_name("zbackupd-gate")
    if not script.exists():
        pytest.fail(f"{script} missing: install the package (pip install -e .)")
    return script


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedServer]:
    zfs = install_stub_zfs(tmp_path / "bin", encrypted=[SECURE])
    config = tmp_path / "gate.toml"
    config.write_text(f'roots = ["{ROOT}"]\nzfs = "{zfs.path}"\n')
    options = f'restrict,command="{gate_command()} --config {config}"'
    with run_openssh_server(tmp_path / "sshd", authorized_key_options=options) as sshd:
        yield GatedServer(sshd, zfs, config)


async def test_the_daemons_commands_pass_through_the_gate(gated: GatedServer) -> None:
    commands = [
        zargv.list_datasets([ROOT]),
        zargv.list_snapshots_and_bookmarks([ROOT], recursive=True),
        zargv.snapshot([SNAP2], recursive=True),
        zargv.holds([SNAP]),
        zargv.hold("zbackupd_disk1", [SNAP]),
        zargv.send_incremental(MARK, SNAP2, Encryption.ENCRYPTED, estimate=True),
        zargv.release("zbackupd_disk1", [SNAP]),
        zargv.destroy_bookmark(MARK),
        zargv.bookmark(SNAP2, MARK),
    ]
    async with await connect(gated.sshd.target(), gated.sshd.client_key) as remote:
        results = [await remote.run(command) for command in commands]
    assert [call[1:] for call in gated.zfs.calls()] == [command[1:] for command in commands]
    assert [row.name for row in parse.parse_datasets(results[0].text)] == [ROOT]
    snapshots, bookmarks = parse.parse_versions(results[1].text)
    assert [s.name for s in snapshots] == [SNAP]
    assert [b.name for b in bookmarks] == [MARK]
    assert [h.tag for h in parse.parse_holds(results[3].text)] == ["zbackupd_disk1"]
    assert parse.parse_send_estimate(results[5].text) == SEND_SIZE
    # zfs ran with the gate's scrubbed environment, not the SSH session's.
    for env in gated.zfs.environments():
        assert env == {"PATH": gate.SAFE_PATH, "LC_ALL": "C"}


async def test_a_send_streams_through_the_gate_intact(gated: GatedServer) -> None:
    send_argv = zargv.send_incremental(MARK, SNAP2, Encryption.PLAIN)
    async with await connect(gated.sshd.target(), gated.sshd.client_key) as remote:
        result = await stream(
            remote, send_argv, LocalRunner(), [sys.executable, "-c", SHA256_OF_STDIN]
        )
    lookup, stub_argv = gated.zfs.calls()  # the gate checked the encryption first
    assert lookup[1:] == ("get", "-H", "-o", "value", "encryption", ROOT)
    assert stub_argv[1:] == send_argv[1:]
    assert result.bytes_transferred == SEND_SIZE
    expected = hashlib.sha256(send_payload(stub_argv)).hexdigest()
    assert result.receive.text.strip() == expected


HOSTILE = [
    ["zfs", "destroy", "-r", ROOT],
    ["zfs", "destroy", f"{ROOT}@manual"],
    ["zfs", "send", "-R", "-w", SNAP],
    ["zfs", "send", "-w", "tank/other@zbackupd_20250101T000000Z"],
    ["zfs", "receive", "-F", ROOT],
    ["zfs", "set", "readonly=off", ROOT],
    ["zpool", "export", "tank"],
    ["sh", "-c", "zfs list"],
    ["zfs", "send", "-w", f"{SNAP}; touch /tmp/zbackupd-gate-pwned"],
]


async def test_hostile_commands_on_the_same_connection_are_refused(gated: GatedServer) -> None:
    async with await connect(gated.sshd.target(), gated.sshd.client_key) as remote:
        await remote.run(zargv.holds([SNAP]))
        for argv in HOSTILE:
            with pytest.raises(CommandError) as caught:
                await remote.run(argv)
            assert caught.value.returncode == gate.EXIT_REFUSED, argv
            assert caught.value.stderr.startswith("zbackupd-gate: refused: "), argv
            assert caught.value.stderr.count("\n") == 1
        await remote.run(zargv.holds([SNAP]))  # the connection still works
    assert [call[1] for call in gated.zfs.calls()] == ["holds", "holds"]


async def test_a_plaintext_send_of_an_encrypted_dataset_is_refused(gated: GatedServer) -> None:
    """The gate asks zfs itself; only the raw send of the encrypted dataset goes through."""
    snapshot = f"{SECURE}@zbackupd_20250101T000000Z"
    async with await connect(gated.sshd.target(), gated.sshd.client_key) as remote:
        for argv in (
            zargv.send_full(snapshot, Encryption.PLAIN),
            zargv.send_full(snapshot, Encryption.PLAIN, estimate=True),
        ):
            with pytest.raises(CommandError) as caught:
                await remote.run(argv)
            assert caught.value.returncode == gate.EXIT_REFUSED
            assert "encrypted" in caught.value.stderr
        result = await remote.run(zargv.send_full(snapshot, Encryption.ENCRYPTED, estimate=True))
    assert parse.parse_send_estimate(result.text) == SEND_SIZE
    assert [call[1] for call in gated.zfs.calls()] == ["get", "get", "send"]


def test_unquoted_shell_syntax_from_an_openssh_client_is_refused(
    gated: GatedServer, tmp_path: Path
) -> None:
    """The OpenSSH client joins its words with spaces: the gate gets raw shell syntax."""
    marker = tmp_path / "pwned"
    hostile = f"zfs holds -H -p {SNAP}; touch {marker}; zfs list $(touch {marker})"
    completed = subprocess.run(
        gated.sshd.ssh_argv(hostile), capture_output=True, text=True, timeout=30, check=False
    )
    assert completed.returncode == gate.EXIT_REFUSED
    assert "zbackupd-gate: refused" in completed.stderr
    assert not marker.exists()
    assert gated.zfs.calls() == []


def test_an_interactive_login_is_refused(gated: GatedServer) -> None:
    argv = gated.sshd.ssh_argv()  # no remote command: sshd gets a shell request
    argv.insert(-1, "-T")  # no pty (restrict forbids one anyway)
    completed = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == gate.EXIT_REFUSED
    assert "interactive logins are not allowed" in completed.stderr
    assert gated.zfs.calls() == []
