"""sd_notify: tell systemd we are ready, what we are doing, that we are alive.

Written here rather than taken from the ``sdnotify`` package, which encodes latin-1 and
swallows every error (design.md §5). Protocol: one datagram of ``KEY=value`` lines to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (``@`` marks the abstract namespace).
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Protocol

from zbackupd.errors import TransientError


class NotifyError(TransientError):
    """systemd's notification socket refused a message."""

    def __init__(self, socket_path: str, reason: str) -> None:
        self.socket_path = socket_path
        super().__init__(f"sd_notify to {socket_path} failed: {reason}")


class Notifier(Protocol):
    """What the daemon tells systemd. ``NullNotifier`` when not run by systemd."""

    def notify(self, **fields: str) -> None: ...

    def ready(self, status: str | None = None) -> None: ...

    def status(self, text: str) -> None: ...

    def watchdog(self) -> None: ...

    def stopping(self, status: str | None = None) -> None: ...


def _one_line(text: str) -> str:
    """STATUS= must be a single line: systemd shows only up to the first newline."""
    return " ".join(text.split())


def _message(fields: dict[str, str]) -> bytes:
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"sd_notify field name {key!r} is not of the form [A-Z0-9_]+")
        if "\n" in value:
            raise ValueError(f"sd_notify field {key} must be one line")
        lines.append(f"{key}={value}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class _NotifyBase:
    def notify(self, **fields: str) -> None:
        raise NotImplementedError

    def ready(self, status: str | None = None) -> None:
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = _one_line(status)
        self.notify(**fields)

    def status(self, text: str) -> None:
        self.notify(STATUS=_one_line(text))

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    def stopping(self, status: str | None = None) -> None:
        fields = {"STOPPING": "1"}
        if status is not None:
            fields["STATUS"] = _one_line(status)
        self.notify(**fields)


class SocketNotifier(_NotifyBase):
    """Sends to a real ``AF_UNIX`` datagram socket; every failure is raised, not hidden."""

    def __init__(self, socket_path: str) -> None:
        if not socket_path or socket_path[0] not in "/@":
            raise ValueError(f"NOTIFY_SOCKET {socket_path!r} is neither a path nor @abstract")
        self.socket_path = socket_path
        self._address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path

    def notify(self, **fields: str) -> None:
        # A socket per message, like libsystemd's sd_notify: nothing to leak or to reconnect.
        message = _message(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as error:
            raise NotifyError(self.socket_path, error.strerror or str(error)) from error


class NullNotifier(_NotifyBase):
    """Not under systemd: the messages are still validated, then dropped."""

    def notify(self, **fields: str) -> None:
        _message(fields)


def notifier_from_environment(environ: MutableMapping[str, str] | None = None) -> Notifier:
    """Take ``$NOTIFY_SOCKET`` out of the environment (children must not inherit it)."""
    env = os.environ if environ is None else environ
    path = env.pop("NOTIFY_SOCKET", None)
    return SocketNotifier(path) if path else NullNotifier()


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, if meant for us."""
    env = os.environ if environ is None else environ
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if usec is None:
        return None
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
