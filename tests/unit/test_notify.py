"""sd_notify against a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from zbackupd.service.notify import (
    NotifyError,
    NullNotifier,
    SocketNotifier,
    notifier_from_environment,
    watchdog_interval,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_ready_and_status_arrive_as_utf8_lines(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = SocketNotifier(path)
    notifier.ready("idle — waiting for a disk")
    assert sock.recv(4096).decode("utf-8") == "READY=1\nSTATUS=idle — waiting for a disk\n"
    notifier.status("backing up disk\noffsite-a")
    assert sock.recv(4096) == b"STATUS=backing up disk offsite-a\n"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    notifier.stopping("stopping")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping\n"


def test_abstract_namespace_socket() -> None:
    name = f"zbackupd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        SocketNotifier("@" + name).ready()
        assert sock.recv(4096) == b"READY=1\n"
    finally:
        sock.close()


def test_errors_are_raised_not_swallowed(tmp_path: Path) -> None:
    notifier = SocketNotifier(str(tmp_path / "nobody-listens.sock"))
    with pytest.raises(NotifyError, match=r"nobody-listens\.sock"):
        notifier.ready()


def test_environment_is_consumed_so_children_do_not_inherit(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    env = {"NOTIFY_SOCKET": path, "PATH": "/usr/bin"}
    notifier = notifier_from_environment(env)
    assert "NOTIFY_SOCKET" not in env
    notifier.status("x")
    assert sock.recv(4096) == b"STATUS=x\n"
    assert isinstance(notifier_from_environment({}), NullNotifier)


def test_bad_field_names_are_refused() -> None:
    with pytest.raises(ValueError, match="not of the form"):
        NullNotifier().notify(status="lowercase")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_and_only_for_us(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(dict(env)) == expected


def test_watchdog_for_our_own_pid() -> None:
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.5
    assert env == {}
