"""The udev shell: a netlink monitor on the asyncio loop, feeding ``udev.py``'s tracker.

:class:`UdevWatcher` starts the monitor, then enumerates the block devices already there
(coldplug), and from then on drains the monitor whenever its fd is readable; each event
becomes a :class:`~zbackupd.disk.udev.DiskEvent` for the pure
:class:`~zbackupd.disk.udev.DiskTracker`, and what it reports goes to a callback. The
backend (``pyudev``) is a constructor argument: tests pass a fake.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import structlog

from zbackupd.core.model import DiskIdentity
from zbackupd.disk.udev import DiskEvent, DiskTracker, Match, NotOurs, UdevEventMalformed
from zbackupd.errors import TransientError

log = structlog.get_logger(__name__)

# Drain at most this many events per loop callback so a storm cannot starve the loop;
# the fd stays readable and the loop calls us again.
MAX_EVENTS_PER_WAKEUP = 256


class UdevMonitorFailed(TransientError):
    """The netlink monitor or the enumeration failed; watching stopped. Restarting may help."""

    def __init__(self, operation: str, error: OSError) -> None:
        self.operation = operation
        self.errno = error.errno
        self.strerror = error.strerror
        reason = error.strerror or str(error)
        super().__init__(f"udev {operation} failed: {reason} (errno {error.errno})")


class UdevMonitor(Protocol):
    """The part of ``pyudev.Monitor`` the watcher uses; devices come back as property maps."""

    def filter_by(self, subsystem: str) -> None: ...

    def start(self) -> None: ...

    def fileno(self) -> int: ...

    def poll(self, timeout: float) -> Mapping[str, str] | None: ...


class UdevBackend(Protocol):
    """Creates the monitor and enumerates devices; the seam tests replace."""

    def new_monitor(self) -> UdevMonitor: ...

    def enumerate(self, subsystem: str) -> Iterable[Mapping[str, str]]: ...


class _PyudevDevice(Protocol):
    @property
    def properties(self) -> Mapping[str, str]: ...

    @property
    def action(self) -> str | None: ...

    @property
    def device_path(self) -> str: ...


def _device_properties(device: _PyudevDevice) -> dict[str, str]:
    props = dict(device.properties)
    props.setdefault("DEVPATH", device.device_path)
    if device.action is not None:
        props.setdefault("ACTION", device.action)
    return props


class _PyudevMonitor:
    """Adapter: a ``pyudev.Monitor`` whose ``poll`` returns plain property maps."""

    def __init__(self, monitor: object) -> None:
        self._monitor = monitor

    def filter_by(self, subsystem: str) -> None:
        self._monitor.filter_by(subsystem)  # type: ignore[attr-defined]

    def start(self) -> None:
        self._monitor.start()  # type: ignore[attr-defined]

    def fileno(self) -> int:
        fd: int = self._monitor.fileno()  # type: ignore[attr-defined]
        return fd

    def poll(self, timeout: float) -> Mapping[str, str] | None:
        try:
            device: _PyudevDevice | None = self._monitor.poll(  # type: ignore[attr-defined]
                timeout=timeout
            )
        except OSError as error:
            # pyudev turns POLLERR into an OSError without errno; a netlink overflow sets
            # POLLERR with ENOBUFS pending on the socket: fetch (and clear) it from there.
            if error.errno is None:
                pending = _pending_socket_error(self.fileno())
                if pending:
                    raise OSError(pending, os.strerror(pending)) from error
            raise
        return None if device is None else _device_properties(device)


def _pending_socket_error(fd: int) -> int:
    """``SO_ERROR`` of a socket we do not own (reading it clears it), 0 if none."""
    with socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


class PyudevBackend:
    """The real thing: ``pyudev.Context()`` and a netlink monitor on the ``udev`` source."""

    def __init__(self) -> None:
        import pyudev  # noqa: PLC0415 -- only the real daemon needs libudev; tests inject fakes

        self._pyudev = pyudev
        self._context = pyudev.Context()

    def new_monitor(self) -> UdevMonitor:
        return _PyudevMonitor(self._pyudev.Monitor.from_netlink(self._context, source="udev"))

    def enumerate(self, subsystem: str) -> Iterable[Mapping[str, str]]:
        devices: Iterable[_PyudevDevice] = self._context.list_devices(subsystem=subsystem)
        return [_device_properties(device) for device in devices]


class UdevWatcher:
    """Watches udev block events on the running loop and reports matches to a callback.

    Order matters (design.md §5): start the monitor, THEN enumerate, so a disk plugged in
    between is seen at least once; the tracker removes the duplicate. Pass
    ``queue.put_nowait`` of an ``asyncio.Queue`` as ``on_match`` to consume them as a stream.
    """

    def __init__(
        self,
        known: Sequence[DiskIdentity],
        on_match: Callable[[Match], None],
        *,
        backend: UdevBackend | None = None,
        on_error: Callable[[UdevMonitorFailed], None] | None = None,
    ) -> None:
        self._tracker = DiskTracker(known)
        self._on_match = on_match
        self._on_error = on_error
        self._backend = backend
        self._monitor: UdevMonitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None

    @property
    def tracker(self) -> DiskTracker:
        return self._tracker

    def begin_session(self, disk: DiskIdentity) -> None:
        self._tracker.begin_session(disk)

    def end_session(self, disk: DiskIdentity) -> None:
        self._tracker.end_session(disk)

    def set_known(self, known: Sequence[DiskIdentity]) -> None:
        """A reloaded config's disks: events from now on are matched against these."""
        self._tracker.set_known(known)

    @property
    def running(self) -> bool:
        return self._fd is not None

    def start(self) -> None:
        """Start watching on the running loop and report disks already plugged in."""
        if self._fd is not None:
            return
        loop = asyncio.get_running_loop()
        if self._backend is None:
            self._backend = PyudevBackend()
        try:
            monitor = self._backend.new_monitor()
            monitor.filter_by("block")
            monitor.start()
            fd = monitor.fileno()
        except OSError as error:
            raise UdevMonitorFailed("monitor start", error) from error
        self._monitor, self._loop, self._fd = monitor, loop, fd
        loop.add_reader(fd, self._on_readable)
        try:
            coldplug = self._enumerate()
        except UdevMonitorFailed:
            self.stop()
            raise
        # resync, not plain adds: after a stop/start (e.g. following a monitor failure)
        # disks that went away meanwhile are reported removed
        for result in self._tracker.resync(coldplug):
            self._emit(result)

    def stop(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._monitor, self._loop, self._fd = None, None, None

    def _enumerate(self) -> list[DiskEvent]:
        assert self._backend is not None  # noqa: S101 -- set in start() before any call
        try:
            props_list = list(self._backend.enumerate("block"))
        except OSError as error:
            raise UdevMonitorFailed("enumeration", error) from error
        return [e for e in (self._parse(p, coldplug=True) for p in props_list) if e is not None]

    @staticmethod
    def _parse(props: Mapping[str, str], *, coldplug: bool) -> DiskEvent | None:
        try:
            return DiskEvent.from_properties(props, coldplug=coldplug)
        except UdevEventMalformed as error:
            log.warning("udev event skipped", reason=str(error))
            return None

    def _emit(self, result: Match | None) -> None:
        if result is not None and not isinstance(result, NotOurs):
            self._on_match(result)

    def _fail(self, error: UdevMonitorFailed) -> None:
        self.stop()
        log.error("udev watching stopped", reason=str(error))
        if self._on_error is not None:
            self._on_error(error)

    def _on_readable(self) -> None:
        """Drain the monitor without blocking; on overflow re-enumerate after draining."""
        monitor = self._monitor
        if monitor is None:
            return
        overflowed = False
        for _ in range(MAX_EVENTS_PER_WAKEUP):
            try:
                props = monitor.poll(timeout=0)
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    self._fail(UdevMonitorFailed("receive", error))
                    return
                log.warning("udev netlink buffer overflowed; re-enumerating block devices")
                overflowed = True
                continue
            if props is None:
                break
            event = self._parse(props, coldplug=False)
            if event is not None:
                self._emit(self._tracker.observe(event))
        if overflowed:
            self._resync()

    def _resync(self) -> None:
        try:
            present = self._enumerate()
        except UdevMonitorFailed as error:
            self._fail(error)
            return
        for result in self._tracker.resync(present):
            self._emit(result)
