"""The long-running daemon: udev events in, one session per disk, status out.

Holds the only copies of the unlocked secrets (the master key and the decrypted SSH
key), in memory. Tells systemd READY/STATUS/WATCHDOG/STOPPING, serves the control
socket, and on SIGTERM cancels running sessions, which still export their pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import structlog

from zbackupd.config import Config, Disk, Source
from zbackupd.core.status import (
    DaemonStatus,
    DiskStatus,
    Phase,
    as_dict,
    keep_history,
    status_line,
)
from zbackupd.disk.devmap import DeviceMapper, repoint_disk
from zbackupd.disk.power import DiskPower
from zbackupd.disk.udev import (
    Candidate,
    DiskEvent,
    Impostor,
    Match,
    NotOurs,
    Removed,
    SerialMismatch,
)
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.keys.derivation import KeyStore, WrongPassphrase
from zbackupd.keys.secret import SecretBytes
from zbackupd.server import remote
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import RemoteHost
from zbackupd.service.keyring import Keyring, read_credential
from zbackupd.service.monitor import Monitor
from zbackupd.service.notify import Notifier
from zbackupd.service.pool import revive_pool, temporary_pool_name
from zbackupd.service.preview import preview_disk
from zbackupd.service.session import Session
from zbackupd.service.stopping import ChildProcess, own_children, stop_sessions
from zbackupd.service.store import StateStore
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import Runner

log = structlog.get_logger(__name__)

#: The file systemd puts the passphrase credential in (``LoadCredential[Encrypted]=``).
#: How long recovery of a suspended pool may wait for the stuck session to end.
RECOVERY_WAIT_SECONDS = 300.0
#: After a revival, how long the stuck session gets to move before the next try.
REVIVE_RETRY_SECONDS = 45.0
#: How long SIGTERM waits for sessions to abort and export (below the unit's
#: TimeoutStopSec=180): a session whose disk was pulled may be stuck in the kernel.
STOP_GRACE_SECONDS = 150.0


def replug_message(label: str) -> str:
    return f"disk pulled mid-transfer: re-plug disk {label} to finish"


class Watcher(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def begin_session(self, disk: Any) -> None: ...

    def end_session(self, disk: Any) -> None: ...

    def set_known(self, known: tuple[Any, ...]) -> None: ...


#: What a reload cannot change: the keys, the identity and the state live there.
_RESTART_KEYS = ("state_dir", "keys_dir", "ssh_key_file", "control_socket")


def restart_needed(old: Config, new: Config) -> tuple[str, ...]:
    """The ``[daemon]`` keys that differ and need a restart to change."""
    return tuple(f"daemon.{key}" for key in _RESTART_KEYS
                 if getattr(old.daemon, key) != getattr(new.daemon, key))


class Daemon:
    """Wires the pieces together; every collaborator is a constructor argument."""

    def __init__(
        self,
        config: Config,
        *,
        zfs: Zfs,
        runner: Runner,
        keystore: KeyStore,
        store: StateStore,
        notifier: Notifier,
        watcher_factory: Callable[[Callable[[Match], None]], Watcher],
        power: DiskPower | None = None,
        device_mapper: DeviceMapper | None = None,
        watchdog_interval: float | None = None,
        monitor: Monitor | None = None,
        config_loader: Callable[[], Config] | None = None,
        children: Callable[[], list[ChildProcess]] = own_children,
    ) -> None:
        self.config = config
        self._zfs = zfs
        self._runner = runner
        self._store = store
        self._notifier = notifier
        self._watcher = watcher_factory(self._on_match)
        self._power = power or DiskPower()
        #: Pools are imported through a mapping per disk (``devmap``); None: directly.
        self._device_mapper = device_mapper
        self._watchdog_interval = watchdog_interval
        #: Metrics file, stale warnings, alert hook: after each run, on unlock, hourly.
        self._monitor = monitor or Monitor(config, store)
        #: Reads the config file again on SIGHUP (``systemctl reload``); None: no reload.
        self._config_loader = config_loader
        #: The daemon's live child processes: at stop, the ones left are stuck.
        self._children = children
        self._status = DaemonStatus(locked=True)
        self._sessions: dict[str, asyncio.Task[None]] = {}
        self._active: dict[str, Session] = {}  # the Session behind each task in _sessions
        self._recoveries: dict[str, asyncio.Task[None]] = {}
        #: Server snapshots the running sessions rely on: one registry shared by all of them.
        self._snapshots_in_use = InUseRegistry()
        #: Disks pulled under a session that has not ended: the status says "re-plug"
        #: whatever the (stuck) session still reports, until the disk is back.
        self._pulled: set[str] = set()
        self._waiting: dict[str, DiskEvent] = {}
        self._stopping = asyncio.Event()
        #: The unlocked keys, in memory only.
        self._keys = Keyring(keystore, stopping=self._stopping)
        for label, record in store.last_runs().items():
            disk = config.disk_by_label(label)
            if disk is not None:
                success = record if record.ok else store.last_success(label)
                self._status = self._status.with_disk(DiskStatus(
                    label, disk.serial, Phase.DONE if record.ok else Phase.FAILED,
                    run_id=record.run_id, last_result=record.summary,
                    last_success=success.finished if success is not None else None,
                ))

    # -- status --------------------------------------------------------------------------

    @property
    def status(self) -> DaemonStatus:
        return self._status

    def _update(self, disk: DiskStatus) -> None:
        """A disk's new status; what it does not know of the disk's history (a running or
        failed session: the last result, the last success) is kept from before."""
        previous = next((d for d in self._status.disks if d.label == disk.label), None)
        self._status = self._status.with_disk(keep_history(previous, disk))
        self._publish()

    def _publish(self) -> None:
        self._notifier.status(status_line(self._status))

    async def handle_status(self) -> dict[str, Any]:
        return as_dict(self._status)

    # -- unlocking -----------------------------------------------------------------------

    async def handle_unlock(self, passphrase: SecretBytes) -> dict[str, Any]:
        """Derive the keys (off the loop), decrypt the SSH key, then start waiting disks."""
        try:
            await self._keys.unlock(passphrase, self.config.daemon.ssh_key_file)
        except WrongPassphrase:
            when = time.strftime("%H:%M")
            self._status = replace(
                self._status,
                notice=f"unlock refused at {when}: wrong passphrase — no disk was touched",
            )
            log.warning("unlock refused: wrong passphrase")
            self._publish()
            raise
        self._status = replace(self._status, locked=False, notice="")
        log.info("unlocked")
        self._publish()
        for label, event in list(self._waiting.items()):
            del self._waiting[label]
            disk = self.config.disk_by_label(label)
            if disk is not None:
                self._start_session(disk, event)
        return as_dict(self._status)

    async def handle_plan(self, label: str | None) -> dict[str, Any]:
        """``zbackupd plan``: what each disk's next plug-in would send (the server asked
        through the gate with the unlocked key; nothing is changed anywhere)."""
        disks = [d for d in self.config.disks if label is None or d.label == label]
        if label is not None and not disks:
            raise PermanentError(f"no disk {label!r} in the configuration")
        self._keys.client_key()  # locked: say so before connecting anywhere
        return {"disks": [{"label": disk.label,
                           "sources": await preview_disk(self.config, disk, self._connect)}
                          for disk in disks]}

    async def _unlock_from_credential(self) -> None:
        credential = read_credential()
        if credential is None:
            return
        passphrase, path = credential
        try:
            await self.handle_unlock(passphrase)
            log.info("unlocked from credential", credential=path)
        except ZbackupdError as error:
            log.error("unlock from credential failed", credential=path, error=str(error))
        finally:
            passphrase.wipe()

    def _pool_key(self, disk: Disk) -> Callable[[], bytearray]:
        return lambda: self._keys.pool_key(disk.label)

    async def _connect(self, source: Source) -> RemoteHost:
        target = remote.SshTarget.from_source(
            source, command_timeout=float(self.config.daemon.stall_timeout_seconds))
        return await remote.connect(target, self._keys.client_key())

    # -- udev ----------------------------------------------------------------------------

    def _on_match(self, match: Match) -> None:
        if isinstance(match, NotOurs):
            return
        disk = self.config.disk_by_label(match.identity.label)
        if disk is None:
            return
        if isinstance(match, Impostor | SerialMismatch):
            log.error("disk refused", disk=disk.serial, disk_label=disk.label,
                      reason=match.describe())
            self._update(DiskStatus(disk.label, disk.serial, Phase.REFUSED,
                                    message=match.describe()))
            return
        if isinstance(match, Removed):
            self._on_removed(disk)
            return
        if isinstance(match, Candidate):
            self._on_candidate(disk, match.event)

    def _on_candidate(self, disk: Disk, event: DiskEvent) -> None:
        was_pulled = disk.label in self._pulled
        self._pulled.discard(disk.label)  # it is back: sessions report for themselves again
        running = self._sessions.get(disk.label)
        current = next((d for d in self._status.disks if d.label == disk.label), None)
        if running is not None and not running.done():
            pulled = was_pulled or (current is not None and current.phase is Phase.SUSPENDED)
            recovering = self._recoveries.get(disk.label)
            if pulled and (recovering is None or recovering.done()):
                log.info("pulled disk is back", disk=disk.serial, disk_label=disk.label,
                         device=event.device_node)
                self._recoveries[disk.label] = asyncio.create_task(
                    self._recover(disk, event, running)
                )
            return
        if not self._keys.unlocked:
            self._waiting[disk.label] = event
            log.info("disk waits for unlock", disk=disk.serial, disk_label=disk.label)
            self._update(DiskStatus(disk.label, disk.serial, Phase.WAITING_FOR_UNLOCK,
                                    message="run `zbackupd unlock`"))
            return
        self._start_session(disk, event)

    def _on_removed(self, disk: Disk) -> None:
        self._waiting.pop(disk.label, None)
        running = self._sessions.get(disk.label)
        current = next((d for d in self._status.disks if d.label == disk.label), None)
        if running is None or running.done() or current is None:
            if current is not None and current.phase is Phase.WAITING_FOR_UNLOCK:
                self._update(replace(current, phase=Phase.DONE, message="unplugged"))
            return
        session = self._active.get(disk.label)
        phase = session.status.phase if session is not None else current.phase
        if phase in (Phase.POWERING_OFF, Phase.DONE):
            return  # our own power-off removed it
        # The session cannot finish without its disk, and may be stuck in the kernel
        # (a receive waiting for the pool's sync): say what to do, whatever it reports.
        self._pulled.add(disk.label)
        log.error("disk pulled during a session", disk=disk.serial, disk_label=disk.label,
                  phase=phase.value)
        self._update(replace(current, phase=Phase.SUSPENDED,
                             message=replug_message(disk.label), progress=None))
        asyncio.create_task(self._log_pool_health(disk))  # noqa: RUF006 -- only logs

    async def _log_pool_health(self, disk: Disk) -> None:
        """For the journal: what ZFS makes of the pull (SUSPENDED, or ONLINE and stuck)."""
        await asyncio.sleep(10)  # the failed writes take a sync interval to show
        try:
            async with asyncio.timeout(30):
                rows = await self._zfs.list_pools()
        except (ZbackupdError, TimeoutError) as error:
            log.warning("pool state unknown after removal", disk=disk.serial, error=str(error))
            return
        for row in rows:
            if row.guid == disk.pool_guid:
                log.warning("pool of pulled disk", disk=disk.serial, disk_label=disk.label,
                            pool=row.name, health=row.health.value)

    async def _recover(self, disk: Disk, event: DiskEvent, stuck: asyncio.Task[None]) -> None:
        """The pulled disk is back: revive the pool so the stuck session goes on.

        The session learns the new device nodes (its power-off must reach the disk as it
        is now). If it still ends without finishing (it had given up while the disk was
        away), a new session continues from the pool as it is (resume tokens included).
        """
        session = self._active.get(disk.label)
        if session is not None:
            session.replugged(import_device=event.import_path or "",
                              power_device=event.device_node or event.import_path or "")
            self._update(replace(session.status, message="disk is back: resuming"))
        await self._repoint_mapping(disk, event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_WAIT_SECONDS
        attempt = 0
        try:
            while not stuck.done() and loop.time() < deadline:
                # Again if a try did not get it going (the pool may have turned
                # SUSPENDED meanwhile): each try is ``zpool reopen`` + ``clear``.
                attempt += 1
                revival = await revive_pool(self._runner, temporary_pool_name(disk.label))
                log.info("pool revived after re-plug", disk=disk.serial, disk_label=disk.label,
                         attempt=attempt, problems=revival.problems or None,
                         health_before=revival.health_before.value
                         if revival.health_before else None)
                left = max(deadline - loop.time(), 1.0)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(REVIVE_RETRY_SECONDS, left)):
                        await asyncio.shield(stuck)
            if not stuck.done():
                log.error("earlier session still stuck after re-plug", disk=disk.serial,
                          attempts=attempt)
                current = next(d for d in self._status.disks if d.label == disk.label)
                self._update(replace(current, phase=Phase.SUSPENDED,
                                     message=f"still stuck after re-plug of disk {disk.label}: "
                                     "restart the machine"))
                return
        except asyncio.CancelledError:
            if not stuck.done():
                raise
        if session is not None and session.status.phase is Phase.DONE:
            return
        if self._stopping.is_set():
            return
        log.info("continuing in a new session", disk=disk.serial, disk_label=disk.label)
        self._run_session_now(disk, event)

    async def _repoint_mapping(self, disk: Disk, event: DiskEvent) -> None:
        """Put the re-plugged disk back under its pool's mapping; the revive's ``zpool
        clear`` then resumes the pool's I/O on it."""
        if self._device_mapper is not None and event.import_path:
            await repoint_disk(self._device_mapper, disk.label, event.import_path,
                              log.bind(disk=disk.serial))

    # -- sessions ------------------------------------------------------------------------

    def _start_session(self, disk: Disk, event: DiskEvent) -> None:
        running = self._sessions.get(disk.label)
        if running is not None and not running.done():
            return
        self._run_session_now(disk, event)

    def _run_session_now(self, disk: Disk, event: DiskEvent) -> None:
        session = Session(
            config=self.config,
            disk=disk,
            import_device=event.import_path or "",
            power_device=event.device_node or event.import_path or "",
            zfs=self._zfs,
            runner=self._runner,
            connect=self._connect,
            power=self._power,
            report=self._session_report,
            pool_key=self._pool_key(disk),
            snapshots_in_use=self._snapshots_in_use,
            device_mapper=self._device_mapper,
        )
        self._active[disk.label] = session
        self._sessions[disk.label] = asyncio.create_task(self._run_session(disk, session))

    def _session_report(self, disk: DiskStatus) -> None:
        """A session's phase, unless its disk was pulled: then "re-plug" is what matters."""
        if disk.label in self._pulled and disk.phase is not Phase.DONE:
            disk = replace(disk, phase=Phase.SUSPENDED, message=replug_message(disk.label),
                           progress=None)
        self._update(disk)

    async def _run_session(self, disk: Disk, session: Session) -> None:
        self._watcher.begin_session(disk.identity)
        try:
            with structlog.contextvars.bound_contextvars(
                disk=disk.serial, disk_label=disk.label, run_id=session.run_id
            ):
                record = await session.run()
            self._store.record_run(record)
            self._session_report(session.status)
            self._set_stale(await self._monitor.after_run(record, locked=self._status.locked))
            log.info(f"run finished: {record.summary}, {record.bytes_sent} bytes sent",
                     disk=disk.serial, run_id=session.run_id, ok=record.ok,
                     summary=record.summary, bytes_sent=record.bytes_sent)
        finally:
            self._watcher.end_session(disk.identity)

    # -- main loop -----------------------------------------------------------------------

    def _set_stale(self, notes: tuple[str, ...]) -> None:
        if notes != self._status.stale:
            self._status = replace(self._status, stale=notes)
            self._publish()

    def reload(self) -> None:
        """SIGHUP: the new config for what comes next (running sessions keep theirs); a bad
        one, or one moving the keys or the state, is refused and the running one stays."""
        if self._config_loader is None:
            return
        try:
            new = self._config_loader()
        except ZbackupdError as error:
            log.error(f"configuration reload refused, the running one stays: {error}")
            return
        if moved := restart_needed(self.config, new):
            log.error("configuration reload refused, the running one stays: "
                      f"{', '.join(moved)} changed (restart zbackupd for that)")
            return
        self.config = self._monitor.config = new
        self._watcher.set_known(tuple(disk.identity for disk in new.disks))
        log.info(f"configuration reloaded: {len(new.disks)} disk(s), "
                 f"{len(new.sources)} source(s)", locked=self._status.locked)

    def stop(self) -> None:
        self._stopping.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    async def run(self, control: Any) -> None:
        """Serve until ``stop()`` (SIGTERM/SIGINT); then cancel sessions and say goodbye."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watchdog = (
            asyncio.create_task(self._watchdog(self._watchdog_interval))
            if self._watchdog_interval
            else None
        )
        await control.start()
        try:
            await self._unlock_from_credential()
            self._watcher.start()
            monitor = asyncio.create_task(
                self._monitor.watch(lambda: self._status.locked, self._set_stale))
            self._notifier.ready(status_line(self._status))
            log.info("zbackupd ready", disks=[d.label for d in self.config.disks])
            await self._stopping.wait()
            self._notifier.stopping("stopping: aborting transfers and exporting pools")
            log.info("stopping")
            self._watcher.stop()
            monitor.cancel()
            await stop_sessions([*self._sessions.values(), *self._recoveries.values()],
                                grace=STOP_GRACE_SECONDS, pulled=self._pulled,
                                children=self._children)
        finally:
            # The keys go first: nothing after this line may keep them alive by stalling.
            self._stopping.set()  # an unlock still deriving drops its key (DaemonStopping)
            self._keys.wipe()
            await control.close()
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
