"""One backup of one attached disk, as an explicit state machine.

import → verify identity → unlock → for each source: connect → snapshot → list → plan
→ transfer → move cursor → prune → unload key → export → power off → record.

The session orchestrates three units, each with explicit inputs: ``pool.DiskPool`` (the
pool's life from mapping to power-off), ``source_run.SourceRun`` (one source: snapshot,
list, placeholders) and ``replicate.DatasetReplication`` (one dataset: plan, transfer,
hold, cursor, prunes). Every phase is reported through ``report`` (the daemon turns it
into ``STATUS=`` and the control socket's answer). Failures of one dataset are isolated
(the others still run), and so are a source's: its problems are recorded as
``source <name>: …`` and the next source runs. A source that failed transiently (server
unreachable, link cut, transfer stalled: ``error.transient``) is tried again after a
backoff while the retry window lasts (``[daemon] retry_window_seconds``, ``core/retry``),
re-planned from scratch (an interrupted receive resumes from its token); meanwhile the
other sources run and the status says "retrying server X in N s, attempt k/n". Failures
of the disk (import, key, export, a suspended pool) end the session.
Whatever happens after the pool was imported, the session tries to unload the key and
export it, unless the pool is suspended (the disk was pulled): then it says so and leaves
the pool for ``zpool clear`` when the same disk comes back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from zbackupd.config import Config, Disk, Source
from zbackupd.core.retry import gave_up_message, retry_message
from zbackupd.core.status import DiskStatus, Phase, Progress
from zbackupd.disk.devmap import DeviceMapper
from zbackupd.errors import ZbackupdError
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import stream
from zbackupd.service.pool import (
    DiskPool,
    PoolIdentityMismatch,
    PoolImportedElsewhere,
    PowerSwitch,
    WrongDiskKey,
)
from zbackupd.service.replicate import DatasetReplication
from zbackupd.service.retrying import (
    PendingRetry,
    SourceInterrupted,
    StallStreamer,
    TransferWatch,
    retry_policy,
    wait_until,
)
from zbackupd.service.source_run import (
    Connector,
    SourceDatasetInfo,
    SourceRun,
    run_snapshot_short_name,
    up_to,
)
from zbackupd.service.store import DatasetResult, RunRecord
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import Runner

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _SourceLog:
    """One source's datasets and problems, as its latest attempt left them."""

    results: list[DatasetResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _RunLog:
    """Mutable tally of one run; frozen into a ``RunRecord`` at the end."""

    sources: dict[str, _SourceLog] = field(default_factory=dict)
    bytes_sent: int = 0  # every attempt's: bytes that really moved

    @property
    def results(self) -> list[DatasetResult]:
        return [result for log in self.sources.values() for result in log.results]

    @property
    def problems(self) -> list[str]:
        return [problem for log in self.sources.values() for problem in log.problems]


class Session:
    """One run for one disk. Construct, then ``await run()`` once."""

    def __init__(
        self,
        *,
        config: Config,
        disk: Disk,
        import_device: str,
        power_device: str,
        zfs: Zfs,
        runner: Runner,
        connect: Connector,
        power: PowerSwitch,
        report: Callable[[DiskStatus], None],
        pool_key: Callable[[], bytearray],
        snapshots_in_use: InUseRegistry,
        device_mapper: DeviceMapper | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        run_id: str | None = None,
        streamer: StallStreamer = stream,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.disk = disk
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._zfs = zfs
        self._runner = runner
        self._connect = connect
        self._report = report
        self._pool_key = pool_key
        self._now = now
        self._clock = clock
        self._sleep = sleep
        #: The streamer every dataset transfers with: the stall timeout applied, the
        #: transient failure of the current source attempt remembered.
        self.transfers = TransferWatch(streamer, float(config.daemon.stall_timeout_seconds))
        self._status = DiskStatus(disk.label, disk.serial, Phase.DETECTED, run_id=self.run_id)
        self._log = log.bind(disk=disk.serial, disk_label=disk.label, run_id=self.run_id)
        self._tally = _RunLog()
        #: The server snapshots this run relies on, so a concurrent run does not prune them.
        self._in_use = snapshots_in_use.lease(self.run_id)
        self.pool = DiskPool(
            disk=disk,
            zfs=zfs,
            runner=runner,
            power=power,
            import_device=import_device,
            power_device=power_device,
            enter=self._enter,
            log=self._log,
            device_mapper=device_mapper,
        )

    # -- reporting -------------------------------------------------------------------------

    @property
    def status(self) -> DiskStatus:
        return self._status

    def replugged(self, *, import_device: str, power_device: str) -> None:
        """The disk came back under new device nodes: power off (and re-import) those."""
        self.pool.replugged(import_device=import_device, power_device=power_device)

    def _enter(self, phase: Phase, message: str = "", progress: Progress | None = None) -> None:
        self._status = replace(self._status, phase=phase, message=message, progress=progress)
        self._report(self._status)
        if phase is not Phase.TRANSFERRING or progress is None:
            self._log.info(f"disk {self.disk.label}: {phase.value}", phase=phase.value,
                           detail=message or None)

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> RunRecord:
        """Run the whole session; always returns a record (the outcome is in it)."""
        started = time.time()
        outcome = "ok"
        ok = False
        pool = self.pool
        try:
            warning = await self._use_disk()
            ok = not self._tally.problems
            outcome = "ok" if ok else "finished with problems: " + "; ".join(self._tally.problems)
            if warning is not None:
                outcome += f"; warning: {warning}"
            self._enter(Phase.DONE, outcome)
        except asyncio.CancelledError:
            left = "pool still imported" if pool.imported else "pool exported"
            self._enter(Phase.FAILED, f"stopped: transfer aborted, {left}")
            raise
        except parse.PoolSuspended as error:
            outcome = f"disk pulled mid-write: re-plug disk {self.disk.label} to finish"
            self._log.error("pool suspended", error=str(error))
            self._enter(Phase.SUSPENDED, outcome)
        except (PoolIdentityMismatch, PoolImportedElsewhere, WrongDiskKey) as error:
            outcome = f"refused: {error}{self._what_was_left()}"
            self._log.error("disk refused", error=str(error))
            self._enter(Phase.REFUSED, outcome)
        except ZbackupdError as error:
            outcome = f"failed: {error}{self._what_was_left()}"
            self._log.error("session failed", error=str(error), error_type=type(error).__name__,
                            transient=error.transient)
            self._enter(Phase.FAILED, outcome)
        finally:
            self._in_use.release()
            await pool.unmap()  # a failed import or a refusal; never while the pool is imported
        finished = time.time()
        self._status = replace(
            self._status,
            last_result=f"{outcome} ({datetime.fromtimestamp(finished, UTC):%Y-%m-%d %H:%M} UTC)",
            last_success=finished if ok else None,
        )
        return RunRecord(
            run_id=self.run_id,
            disk_label=self.disk.label,
            serial=self.disk.serial,
            started=started,
            finished=finished,
            ok=ok,
            summary=outcome,
            datasets=tuple(self._tally.results),
            bytes_sent=self._tally.bytes_sent,
        )

    async def _use_disk(self) -> str | None:
        """Open the pool, back up every source, close the pool, unmap, power off; returns
        a warning for the status line when the power-off failed (the backup still counts:
        the pool is exported).

        Whatever goes wrong once zbackupd has imported the pool, the pool is exported
        before the session ends (a suspended one excepted: see ``DiskPool.close``): a
        refused disk (wrong key, other pool) too. A refused disk is left powered on: it
        is ours, the admin may want to look at it, and exported it is safe to unplug.
        """
        pool = self.pool
        failure: ZbackupdError | None = None
        try:
            await pool.open()
            await pool.unlock(self._pool_key)
            await self._back_up_sources()
        except ZbackupdError as error:
            failure = error
        finally:  # also when cancelled (SIGTERM): the transfer is aborted, the pool exported
            close_error = await self._close(failure)
        if failure is not None:
            raise failure
        if close_error is not None:
            raise close_error
        await pool.unmap()  # before the power-off, which proves nothing holds the disk
        try:
            await pool.power_off()
        except ZbackupdError as error:
            self._log.warning("disk not powered off", error=str(error),
                              error_type=type(error).__name__)
            return (f"disk {self.disk.label} not powered off ({error}); pool exported: "
                    "safe to unplug")
        return None

    async def _close(self, failure: ZbackupdError | None) -> ZbackupdError | None:
        """Export the pool if zbackupd has it imported; returns what failed instead of
        raising, so that an earlier ``failure`` (the reason for the session's end) is
        not replaced by the export's trouble."""
        if not self.pool.imported:
            return None
        try:
            await self.pool.close()
        except ZbackupdError as error:
            if failure is None:
                return error
            if not isinstance(error, parse.PoolSuspended):
                self._log.error("export failed after an earlier failure", error=str(error),
                                error_type=type(error).__name__, earlier=str(failure))
        return None

    def _what_was_left(self) -> str:
        """For the status line after a refusal or failure: the pool's and disk's state."""
        if self.pool.imported:
            return f"; pool {self.pool.name} is still imported: export it by hand"
        if self.pool.was_imported:
            return "; pool exported, disk left powered on (safe to unplug)"
        return ""

    # -- one source --------------------------------------------------------------------------

    def source_run(self, source: Source, remote: RemoteHost) -> SourceRun:
        """``source``'s unit of work over an open connection (the pool is imported: its
        datasets go by the pool's temporary name)."""
        return SourceRun(disk=self.pool.as_imported, source=source, remote=remote, zfs=self._zfs,
                         in_use=self._in_use, now=self._now, log=self._log)

    def replication(
        self, source: Source, remote: RemoteHost, info: SourceDatasetInfo, *, index: int,
        total: int,
    ) -> DatasetReplication:
        """One selected dataset's unit of work over an open connection."""
        return DatasetReplication(
            config=self.config, disk=self.pool.as_imported, source=source, info=info, remote=remote,
            zfs=self._zfs, runner=self._runner, in_use=self._in_use, now=self._now,
            report=self._enter, log=self._log, index=index, total=total,
            streamer=self.transfers,
        )

    async def _back_up_sources(self) -> None:
        """Every source once, in order; then those that failed transiently, each when its
        backoff is over, while the window lasts (the disk stays imported meanwhile)."""
        policy = retry_policy(self.config.daemon)
        pending: list[PendingRetry] = []
        for source in self.config.sources_for(self.disk):
            self._schedule(policy.next_delay, pending, source, await self._attempt(source))
        while pending:
            entry = min(pending, key=lambda p: p.due)
            pending.remove(entry)

            def show(left: float, entry: PendingRetry = entry) -> None:
                self._enter(Phase.RETRYING, retry_message(
                    entry.source.name, left, entry.failures + 1, policy.max_attempts,
                    str(entry.error)))

            await wait_until(entry.due, self._clock, self._sleep, show)
            await self.pool.raise_if_suspended()  # the disk must still be there
            error = await self._attempt(entry.source)
            self._schedule(policy.next_delay, pending, entry.source, error, entry)

    def _schedule(
        self,
        next_delay: Callable[[int, float], float | None],
        pending: list[PendingRetry],
        source: Source,
        error: ZbackupdError | None,
        earlier: PendingRetry | None = None,
    ) -> None:
        """After an attempt: nothing (done, or a permanent failure recorded), a retry
        queued, or the transient failure recorded as the source's problem."""
        if error is None:
            return
        now = self._clock()
        first = earlier.first_failure if earlier is not None else now
        failures = (earlier.failures if earlier is not None else 0) + 1
        delay = next_delay(failures, now - first)
        facts = {"source": source.name, "error": str(error), "error_type": type(error).__name__,
                 "attempt": failures,
                 "bytes_transferred": getattr(error, "bytes_transferred", None)}
        if delay is None:
            reason = gave_up_message(str(error), failures, now - first)
            self._tally.sources[source.name].problems.append(f"source {source.name}: {reason}")
            self._log.error(f"source {source.name} failed: {reason}", **facts)
            return
        self._log.warning(f"source {source.name} failed transiently: retrying in {delay:.0f} s",
                          retry_in=delay, **facts)
        pending.append(PendingRetry(source, failures, first, now + delay, error))

    async def _attempt(self, source: Source) -> ZbackupdError | None:
        """One try at ``source``: its datasets' results and problems replace an earlier
        try's. Returns a transient failure to retry; a permanent one is recorded."""
        self.transfers.reset()
        log = self._tally.sources[source.name] = _SourceLog()
        try:
            await self._back_up_source(source, log)
        except (parse.PoolSuspended, WrongDiskKey, PoolIdentityMismatch, PoolImportedElsewhere):
            raise  # the disk itself: the session ends
        except ZbackupdError as error:
            if error.transient:
                return error
            log.problems.append(f"source {source.name}: {error}")
            self._log.error(f"source {source.name} failed: {error}", source=source.name,
                            error=str(error), error_type=type(error).__name__, transient=False)
        return None

    async def _back_up_source(self, source: Source, log: _SourceLog) -> None:
        self._enter(Phase.CONNECTING, f"{source.user}@{source.host}:{source.port}")
        remote = await self._connect(source)
        async with remote:
            work = self.source_run(source, remote)
            taken_at = await work.take_snapshots()
            self._enter(Phase.PLANNING, source.name)
            listing = await work.list()
            for row in listing.refused:  # one dataset's bad name sinks only that dataset
                log.results.append(DatasetResult(row.dataset, f"failed: {row.reason}"))
                log.problems.append(f"source {source.name}: {row.explain()}")
                self._log.error(row.explain(), dataset=row.dataset, source=source.name)
            await work.ensure_parents(listing.selected)
            for index, info in enumerate(listing.selected):
                own = run_snapshot_short_name(info.config, taken_at)
                replication = self.replication(
                    source, remote, info, index=index, total=len(listing.selected)
                )
                versions = listing.state(info.name)  # grouped once per source
                outcome = await replication.run(
                    up_to(versions.snapshots, info.name, own), versions.bookmarks
                )
                self._tally.bytes_sent += outcome.result.bytes_sent
                log.results.append(outcome.result)
                if outcome.problem is None:
                    continue
                # A failed transfer may be the disk going away (the receive fails
                # before ZFS says SUSPENDED): the next dataset would hang on it.
                await self.pool.raise_if_suspended()
                cause = self.transfers.failure or remote.link_failure
                if cause is not None and cause.transient:
                    raise SourceInterrupted(source.name, outcome.problem, cause)
                log.problems.append(f"source {source.name}: {outcome.problem}")
