"""Journal records as journald receives them, over a real datagram socket."""

from __future__ import annotations

import array
import io
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from zbackupd.keys.secret import SecretBytes
from zbackupd.service.logs import (
    JournalWriter,
    LogMode,
    configure_logging,
    encode_journal_fields,
    journal_field_name,
)


def decode_native(payload: bytes) -> dict[str, str]:
    """Parse journald's native protocol, as journald does."""
    fields: dict[str, str] = {}
    rest = payload
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            (size,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + size].decode()
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("disk", "DISK"),
        ("run_id", "RUN_ID"),
        ("_private", "PRIVATE"),
        ("1x-y", "X_Y"),
        ("", "FIELD"),
    ],
)
def test_field_names_are_ones_journald_keeps(key: str, name: str) -> None:
    assert journal_field_name(key) == name


def test_multiline_values_use_binary_safe_form() -> None:
    payload = encode_journal_fields([("MESSAGE", "one\ntwo"), ("DISK", "S1")])
    assert decode_native(payload) == {"MESSAGE": "one\ntwo", "DISK": "S1"}
    assert payload.startswith(b"MESSAGE\n" + struct.pack("<Q", 7))


def test_bound_keys_become_searchable_fields(journal: tuple[str, socket.socket]) -> None:
    path, sock = journal
    assert configure_logging(mode="journal", journal_socket=path) == "journal"
    log = structlog.get_logger().bind(disk="SER123", run_id="r-1")
    log.warning("transfer resumed", dataset="tank/home", bytes=1024)
    fields = decode_native(sock.recv(65536))
    assert fields["MESSAGE"] == "transfer resumed"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "zbackupd"
    assert fields["DISK"] == "SER123"
    assert fields["RUN_ID"] == "r-1"
    assert fields["DATASET"] == "tank/home"
    assert fields["BYTES"] == "1024"


def test_secrets_are_redacted(journal: tuple[str, socket.socket]) -> None:
    path, sock = journal
    configure_logging(mode="journal", journal_socket=path)
    secret = bytearray(b"\x01" * 32)
    structlog.get_logger().info("unlock", key_bytes=secret, passphrase="hunter2", note=b"abc")
    fields = decode_native(sock.recv(65536))
    assert fields["KEY_BYTES"] == "<32 bytes redacted>"
    assert fields["PASSPHRASE"] == "<redacted>"
    assert fields["NOTE"] == "<3 bytes redacted>"


def test_oversized_record_goes_through_a_sealed_memfd(journal: tuple[str, socket.socket]) -> None:
    path, sock = journal
    writer = JournalWriter(path)
    payload = encode_journal_fields([("MESSAGE", "x" * (4 * 1024 * 1024))])
    writer.send(payload)
    fds = array.array("i")
    _, ancdata, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(fds.itemsize))
    level, kind, data = ancdata[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fds.frombytes(data[: fds.itemsize])
    with os.fdopen(fds[0], "rb") as received:
        received.seek(0)  # journald maps the memfd from its start
        assert received.read() == payload


def test_unreachable_journal_falls_back_to_stderr(tmp_path: Path) -> None:
    err = io.StringIO()
    writer = JournalWriter(str(tmp_path / "gone.sock"), fallback=err)
    writer.send(encode_journal_fields([("MESSAGE", "hello")]))
    assert "journal unavailable" in err.getvalue()
    assert "MESSAGE=hello" in err.getvalue()


def test_json_mode_off_a_terminal() -> None:
    out = io.StringIO()
    try:
        assert configure_logging(stream=out, environ={}) == "json"
        structlog.get_logger().info("idle", disk="S1")
        record = json.loads(out.getvalue())
        assert record["event"] == "idle"
        assert record["disk"] == "S1"
        assert record["level"] == "info"
    finally:
        structlog.reset_defaults()


PASSPHRASE = "correct horse battery staple"


class Terminal(io.StringIO):
    """A stream that says it is a terminal: the console renderer then uses colours."""

    def isatty(self) -> bool:
        return True


def _derive(passphrase: SecretBytes) -> None:
    """A KDF failing with the passphrase in its locals, as a library's copy would be."""
    copy = bytes(passphrase)
    text = copy.decode()
    raise ValueError(f"KDF failed after {len(text)} characters")


@pytest.mark.parametrize(
    ("mode", "stream"),
    [("console", Terminal), ("console", io.StringIO), ("json", io.StringIO)],
    ids=["console-tty", "console-plain", "json"],
)
def test_a_failing_unlock_logs_its_traceback_without_the_passphrase(
    mode: LogMode, stream: type[io.StringIO]
) -> None:
    """structlog's console renderer picks rich (or better_exceptions) when installed, and
    their tracebacks show every frame's locals: the passphrase among them. Whether or not
    rich is installed here, the console gets a plain traceback."""
    out = stream()
    try:
        configure_logging(mode=mode, stream=out)
        with SecretBytes(PASSPHRASE.encode()) as passphrase:
            try:
                _derive(passphrase)
            except ValueError:
                structlog.get_logger().exception("unlock failed")
        text = out.getvalue()
        assert "KDF failed after 28 characters" in text  # the traceback is there...
        assert "_derive" in text
        assert "correct horse" not in text  # ...but no frame's locals
        assert "b'correct" not in text
    finally:
        structlog.reset_defaults()
