"""Logging: structured records to the journal, readable lines on a terminal, JSON otherwise.

Under systemd the records go to journald over its native protocol, so that every
key a log call binds becomes a searchable field (``journalctl -u zbackupd DISK=…``).
Field names must match ``[A-Z0-9_]`` and not start with ``_`` or a digit, or journald
drops them silently; values with newlines use the binary-safe form (design.md §5).
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogMode = Literal["auto", "journal", "console", "json"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "zbackupd"

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2}
_FIELD_NAME_INVALID = re.compile(r"[^A-Z0-9_]")
_SECRET_KEYS = frozenset(
    {"passphrase", "password", "secret", "private_key", "raw_key", "key_bytes"}
)


def journal_field_name(key: str) -> str:
    """Map a structlog key to a name journald keeps: ``run_id`` → ``RUN_ID``."""
    name = _FIELD_NAME_INVALID.sub("_", key.upper()).lstrip("_0123456789")
    return name[:64] or "FIELD"


def encode_journal_fields(fields: Iterable[tuple[str, str]]) -> bytes:
    """journald's native datagram: ``KEY=value`` lines, or the length-prefixed binary form."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += name.encode("ascii") + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except ValueError:  # circular structures
        return repr(value)


def journal_fields(event_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The journal record for one event: MESSAGE, PRIORITY, identifier, then every bound key."""
    level = str(event_dict.get("level", "info"))
    fields = [
        ("MESSAGE", _text(event_dict.get("event", ""))),
        ("PRIORITY", str(_PRIORITY.get(level, 6))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
    ]
    for key, value in event_dict.items():
        if key in ("event", "level", "timestamp"):
            continue
        fields.append((journal_field_name(key), _text(value)))
    return fields


class JournalWriter:
    """Sends native-protocol datagrams to journald; large ones go through a sealed memfd."""

    def __init__(self, socket_path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self.socket_path = socket_path
        self._fallback = fallback if fallback is not None else sys.stderr

    def send(self, payload: bytes) -> None:
        # A socket per record: nothing to leak, and a restarted journald is simply reached.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(payload, self.socket_path)
            except OSError as error:
                if error.errno in (errno.EMSGSIZE, errno.ENOBUFS):  # too large for a datagram
                    try:
                        self._send_memfd(sock, payload)
                    except OSError:
                        self._fall_back(payload, error)
                    return
                self._fall_back(payload, error)

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        fd = os.memfd_create("zbackupd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            rights = array.array("i", [fd]).tobytes()
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0,
                         self.socket_path)
        finally:
            os.close(fd)

    def _fall_back(self, payload: bytes, error: OSError) -> None:
        """journald unreachable (restarting?): the record still goes somewhere readable."""
        message = payload.split(b"\n", 1)[0].decode("utf-8", "replace")
        print(f"zbackupd: journal unavailable ({error.strerror}): {message}",
              file=self._fallback, flush=True)


class JournalLogger:
    """The structlog "logger" at the end of the chain: takes encoded records, sends them."""

    def __init__(self, writer: JournalWriter) -> None:
        self._writer = writer

    def msg(self, payload: bytes) -> None:
        self._writer.send(payload)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class JournalLoggerFactory:
    def __init__(self, writer: JournalWriter) -> None:
        self._logger = JournalLogger(writer)

    def __call__(self, *args: object) -> JournalLogger:
        return self._logger


def render_journal(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> bytes:
    return encode_journal_fields(journal_fields(event_dict))


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Last line of defence: raw bytes and secret-named keys never reach a log record."""
    for key, value in event_dict.items():
        if isinstance(value, bytes | bytearray | memoryview):
            event_dict[key] = f"<{len(value)} bytes redacted>"
        elif key.lower() in _SECRET_KEYS:
            event_dict[key] = "<redacted>"
    return event_dict


def running_under_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when systemd connected our stderr to the journal (``$JOURNAL_STREAM`` = dev:ino)."""
    expected = environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def choose_mode(mode: LogMode, environ: Mapping[str, str], stream: TextIO) -> LogMode:
    if mode != "auto":
        return mode
    if running_under_journal(environ, stream) and os.path.exists(JOURNAL_SOCKET):
        return "journal"
    return "console" if stream.isatty() else "json"


def configure_logging(
    *,
    mode: LogMode = "auto",
    level: int = logging.INFO,
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
    environ: MutableMapping[str, str] | None = None,
) -> LogMode:
    """Configure structlog (and route stdlib logging, e.g. asyncssh's, through it)."""
    out = stream if stream is not None else sys.stderr
    chosen = choose_mode(mode, os.environ if environ is None else environ, out)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        redact_secrets,
        structlog.processors.format_exc_info,
    ]
    factory: Any
    if chosen == "journal":
        processors = [*shared, render_journal]
        factory = JournalLoggerFactory(JournalWriter(journal_socket))
    elif chosen == "console":
        processors = [
            *shared[:-1],
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            # Never structlog's default here: with rich or better_exceptions installed it
            # renders every frame's locals, a passphrase or key among them.
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
        ]
        factory = structlog.PrintLoggerFactory(out)
    else:
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=True),
        ]
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(level)
    return chosen


class _StructlogHandler(logging.Handler):
    """Forwards records of libraries using stdlib logging (asyncssh) into structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        logger.log(record.levelno, record.getMessage(), logger_name=record.name)


def _route_stdlib_logging(level: int) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(level)
    # asyncssh logs every channel at INFO; its warnings are what an admin needs.
    logging.getLogger("asyncssh").setLevel(max(level, logging.WARNING))
