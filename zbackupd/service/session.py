"""One backup of one attached disk, as an explicit state machine.

import → verify identity → unlock → for each source: connect → snapshot → list → plan
→ transfer → move cursor → prune → unload key → export → power off → record.

Every phase is reported through ``report`` (the daemon turns it into ``STATUS=`` and the
control socket's answer). Failures of one dataset are isolated (the others still run);
failures of the disk (import, key, export) end the session. Whatever happens after the
pool was imported, the session tries to unload the key and export it, unless the pool is
suspended (the disk was pulled): then it says so and leaves the pool for ``zpool clear``
when the same disk comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

import structlog

from zbackupd.config import Config, Disk, Source, SourceDataset
from zbackupd.core import plan as planner
from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot
from zbackupd.core.retention import RetentionPolicy, protections, select_for_destroy
from zbackupd.core.status import DiskStatus, Phase, Progress, human_bytes
from zbackupd.disk.devmap import DeviceMapper, DeviceMapperError, mapping_name
from zbackupd.disk.power import DiskGone, PoweredOff
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.keys.secret import wipe
from zbackupd.server.prune import (
    InUseRegistry,
    OwnSnapshotPolicy,
    ServerPruneFailed,
    other_cursor_short_names,
    prune_dataset,
)
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import TransferProgress, stream
from zbackupd.service.store import DatasetResult, RunRecord
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandTimeout, Runner

log = structlog.get_logger(__name__)

#: How long ``zpool export`` is retried while the pool is busy (seconds, doubling).
EXPORT_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: A resume may reveal another resume (a second interrupted stream): bounded re-planning.
MAX_REPLANS = 4
#: How long ``zpool reopen`` / ``zpool clear`` of a pool whose disk came back may take.
#: Both wait for the pool's stuck transaction group, so each can hang in the kernel.
REVIVE_TIMEOUT_SECONDS = 60.0


class Connector(Protocol):
    """Opens an SSH connection to a configured source (the daemon holds the client key)."""

    def __call__(self, source: Source) -> Awaitable[RemoteHost]: ...


class PowerSwitch(Protocol):
    async def power_off(self, device: str) -> PoweredOff: ...


class PoolIdentityMismatch(PermanentError):
    """The imported pool is not the configured one (name or GUID): refuse to touch it."""


class WrongDiskKey(PermanentError):
    """The pool refused our key: another installation's disk, or another passphrase."""


@dataclass(frozen=True, slots=True)
class SourceDatasetInfo:
    """One server dataset selected for backup and where it lands on the disk."""

    name: str
    encryption: Encryption
    target: str
    config: SourceDataset


@dataclass(slots=True)
class _RunLog:
    """Mutable tally of one run; frozen into a ``RunRecord`` at the end."""

    results: list[DatasetResult] = field(default_factory=list)
    bytes_sent: int = 0
    problems: list[str] = field(default_factory=list)


def target_dataset(disk: Disk, source: Source, dataset: str) -> str:
    """Where ``dataset`` of ``source`` lands: ``<target_root>/<source name>/<dataset>``.

    The source name keeps two servers' ``tank/home`` apart on one disk.
    """
    return f"{disk.target_root}/{source.name}/{dataset}"


def select_datasets(
    disk: Disk, source: Source, rows: Sequence[parse.DatasetRow]
) -> tuple[SourceDatasetInfo, ...]:
    """The server datasets the configuration selects, parents before children."""
    chosen: dict[str, SourceDatasetInfo] = {}
    for config in source.datasets:
        for row in rows:
            if config.selects(row.name):
                chosen.setdefault(
                    row.name,
                    SourceDatasetInfo(
                        row.name, row.encryption, target_dataset(disk, source, row.name), config
                    ),
                )
    return tuple(sorted(chosen.values(), key=lambda info: info.name))


def snapshot_filter(config: SourceDataset) -> planner.SnapshotFilter:
    if config.snapshots == "reuse" and config.reuse_pattern is not None:
        return planner.SnapshotFilter(reuse_patterns=(config.reuse_pattern,))
    return planner.SnapshotFilter(own_prefix=config.snapshot_prefix + "_")


def retention_policy(config: Config, disk: Disk) -> RetentionPolicy:
    kept = config.retention_for(disk)
    return RetentionPolicy(
        keep_last=kept.keep_last,
        hourly=kept.hourly,
        daily=kept.daily,
        weekly=kept.weekly,
        monthly=kept.monthly,
        yearly=kept.yearly,
    )


def revive_steps(pool: str) -> tuple[zargv.Argv, ...]:
    """What brings back a pool whose disk was pulled mid-write and is plugged in again,
    once its device-mapper mapping points at the new device (``devmap``).

    Measured in the VM (OpenZFS 2.3.2, no ZED): after the pull the pool may stay ONLINE
    for a while, its sync thread retrying writes to the vanished device, then it turns
    SUSPENDED ("uncorrectable I/O failure"). While it is not suspended, ``zpool reopen``
    reopens the vdev and ``zpool clear`` resumes. Once SUSPENDED, ``reopen`` is refused
    (the ioctl checks for suspension) and ``clear`` reopens only a vdev already marked
    faulted or unwritable, which a pulled disk's is not: without the mapping the vdev
    stays on the dead block device and the pool suspends again at once. With it, the
    vdev's block device is the mapping, now over the new disk, and ``clear`` resumes the
    I/O there. So the steps do not depend on the pool's health (``clear`` alone would also
    leave ``zpool`` hanging while it logs its history on a still-suspended pool).
    """
    return (zargv.zpool_reopen(pool), zargv.zpool_clear(pool))


async def pool_health(runner: Runner, pool: str, *, timeout: float) -> parse.PoolHealth | None:
    """The pool's health, or None if asking fails or hangs (a pool whose disk was pulled
    may block ``zpool``): the facade's question, bounded and never raising."""
    try:
        return await Zfs(runner, timeout=timeout).pool_health(pool)
    except ZbackupdError:
        return None


@dataclass(frozen=True, slots=True)
class Revival:
    """What ``revive_pool`` found and what failed (empty: every step returned 0)."""

    health_before: parse.PoolHealth | None
    problems: tuple[str, ...]


async def revive_pool(runner: Runner, pool: str, *, timeout: float = REVIVE_TIMEOUT_SECONDS
                      ) -> Revival:
    """Bring a pool back whose disk was pulled and plugged in again; returns what failed.

    See ``revive_steps``. Each command is bounded (a command stuck in the kernel is
    abandoned, not waited for); failures are only reported, after the pool's health
    before the steps: the caller checks whether the session gets going again.
    """
    health = await pool_health(runner, pool, timeout=timeout)
    problems: list[str] = []
    for argv in revive_steps(pool):
        try:
            result = await runner.run(argv, timeout=timeout, check=False)
        except CommandTimeout as error:
            problems.append(str(error))
            continue
        if result.returncode != 0:
            problems.append(str(parse.classify_error(result.argv, result.returncode,
                                                     result.stderr)))
    return Revival(health, tuple(problems))


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
    ) -> None:
        self.config = config
        self.disk = disk
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._import_device = import_device
        self._power_device = power_device
        self._zfs = zfs
        self._runner = runner
        self._connect = connect
        self._power = power
        self._report = report
        self._pool_key = pool_key
        self._now = now
        self._status = DiskStatus(disk.label, disk.serial, Phase.DETECTED, run_id=self.run_id)
        self._log = log.bind(disk=disk.serial, disk_label=disk.label, run_id=self.run_id)
        self._imported = False
        #: The pool is imported from a device-mapper mapping over the disk (``devmap``):
        #: what lets a pool suspended by a pull go on after the re-plug. None: directly.
        self._device_mapper = device_mapper
        self._mapped = False
        self._tally = _RunLog()
        #: The server snapshots this run relies on, so a concurrent run does not prune them.
        self._in_use = snapshots_in_use.lease(self.run_id)

    # -- reporting -------------------------------------------------------------------------

    @property
    def status(self) -> DiskStatus:
        return self._status

    def replugged(self, *, import_device: str, power_device: str) -> None:
        """The disk came back under new device nodes: power off (and re-import) those."""
        self._import_device = import_device
        self._power_device = power_device

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
        try:
            await self._import()
            try:
                await self._unlock()
                for source in self.config.sources_for(self.disk):
                    await self._back_up_source(source)
            finally:
                if self._imported:
                    await self._close_pool()
            await self._unmap()  # before the power-off, which proves nothing holds the disk
            await self._power_off()
            ok = not self._tally.problems
            outcome = "ok" if ok else "finished with problems: " + "; ".join(self._tally.problems)
            self._enter(Phase.DONE, outcome)
        except asyncio.CancelledError:
            self._enter(Phase.FAILED, "stopped: transfer aborted, pool exported")
            raise
        except parse.PoolSuspended as error:
            outcome = f"disk pulled mid-write: re-plug disk {self.disk.label} to finish"
            self._log.error("pool suspended", error=str(error))
            self._enter(Phase.SUSPENDED, outcome)
        except (PoolIdentityMismatch, WrongDiskKey) as error:
            outcome = f"refused: {error}"
            self._log.error("disk refused", error=str(error))
            self._enter(Phase.REFUSED, outcome)
        except ZbackupdError as error:
            outcome = f"failed: {error}"
            self._log.error("session failed", error=str(error), error_type=type(error).__name__,
                            transient=error.transient)
            self._enter(Phase.FAILED, outcome)
        finally:
            self._in_use.release()
            await self._unmap()  # a failed import; never while the pool is imported
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

    # -- pool ------------------------------------------------------------------------------

    async def _find_imported(self) -> parse.PoolRow | None:
        for row in await self._zfs.list_pools():
            if row.guid == self.disk.pool_guid:
                return row
        return None

    async def _import(self) -> None:
        self._enter(Phase.IMPORTING, f"pool {self.disk.pool_name} from {self._import_device}")
        row = await self._find_imported()
        if row is not None:
            # Still imported: an earlier session lost its disk mid-write (we import with
            # cachefile=none and always export). Point its mapping at the re-plugged
            # disk, reopen and clear, then go on from its state.
            self._log.info("pool still imported from an earlier pull: reviving",
                           pool=row.name, health=row.health.value)
            await self._repoint_mapping()
            revival = await revive_pool(self._runner, row.name)
            problems = revival.problems
            row = await self._find_imported()
            self._log.info("pool revived" if row and row.health is parse.PoolHealth.ONLINE
                           else "pool not revived", problems=problems or None,
                           health=row.health.value if row else None)
            if row is not None and row.health is parse.PoolHealth.SUSPENDED:
                raise parse.PoolSuspended(zargv.zpool_reopen(row.name), 1, "; ".join(problems))
        if row is None:
            await self._zfs.import_pool(await self._map_disk(), self.disk.pool_guid)
            row = await self._find_imported()
        if row is None:
            raise PoolIdentityMismatch(
                f"pool GUID {self.disk.pool_guid} is not imported after `zpool import`"
            )
        self._imported = True
        if row.name != self.disk.pool_name:
            raise PoolIdentityMismatch(
                f"pool with GUID {self.disk.pool_guid} is named {row.name!r}, "
                f"configured as {self.disk.pool_name!r}"
            )

    async def _map_disk(self) -> str:
        """The device to import from: the disk's mapping, or the disk itself when there
        is no device-mapper (then a pull mid-write needs a restart to recover)."""
        if self._device_mapper is None:
            return self._import_device
        try:
            path = await self._device_mapper.map(mapping_name(self.disk.label),
                                                 self._import_device)
        except DeviceMapperError as error:
            self._log.warning("importing without a device-mapper layer: a disk pulled "
                              "mid-write will need a restart to finish", error=str(error))
            return self._import_device
        self._mapped = True
        return path

    async def _repoint_mapping(self) -> None:
        """The disk is back under a new device node: point its mapping there."""
        if self._device_mapper is None:
            return
        try:
            mapped = await self._device_mapper.repoint_if_mapped(
                mapping_name(self.disk.label), self._import_device)
        except DeviceMapperError as error:
            self._log.warning("re-pointing the mapping failed", error=str(error))
            return
        if not mapped:
            return
        self._mapped = True
        self._log.info("mapping re-pointed at the re-plugged disk", device=self._import_device)

    async def _unmap(self) -> None:
        """Remove the mapping once the pool is exported (or was never imported)."""
        if self._device_mapper is None or not self._mapped or self._imported:
            return
        try:
            await self._device_mapper.unmap(mapping_name(self.disk.label))
        except DeviceMapperError as error:
            self._log.warning("device-mapper mapping not removed", error=str(error))
            return
        self._mapped = False

    async def _unlock(self) -> None:
        self._enter(Phase.UNLOCKING)
        pool = self.disk.pool_name
        status = await self._zfs.get_properties([pool], ["keystatus"])
        if status.get(pool, {}).get("keystatus") == "available":
            return
        key = self._pool_key()
        try:
            await self._zfs.load_key(pool, key)
        except parse.KeyIncorrect as error:
            raise WrongDiskKey(
                f"the key derived for disk {self.disk.label!r} does not open pool {pool}: "
                "this disk was set up by another installation or passphrase"
            ) from error
        finally:
            wipe(key)

    async def _close_pool(self) -> None:
        pool = self.disk.pool_name
        row = await self._find_imported()
        if row is not None and row.health is parse.PoolHealth.SUSPENDED:
            raise parse.PoolSuspended(("zpool", "list", pool), 1, "pool I/O is suspended")
        self._enter(Phase.EXPORTING)
        with contextlib.suppress(parse.KeyNotLoaded):  # already locked: nothing to unload
            await self._zfs.unload_key(pool)
        for delay in (*EXPORT_BACKOFF, None):
            try:
                await self._zfs.export_pool(pool)
            except parse.PoolBusy:
                if delay is None:
                    raise
                self._log.warning("pool busy, export retried", pool=pool, retry_in=delay)
                await asyncio.sleep(delay)
            else:
                self._imported = False
                return

    async def _power_off(self) -> None:
        self._enter(Phase.POWERING_OFF)
        try:
            done = await self._power.power_off(self._power_device)
        except DiskGone:
            self._log.info("disk already gone: nothing to power off")
            return
        self._log.info("disk powered off", method=str(done.method), written=str(done.written))

    # -- one source --------------------------------------------------------------------------

    async def _back_up_source(self, source: Source) -> None:
        self._enter(Phase.CONNECTING, f"{source.user}@{source.host}:{source.port}")
        remote = await self._connect(source)
        async with remote:
            roots = [dataset.root for dataset in source.datasets]
            taken_at = await self._take_snapshots(remote, source)
            self._enter(Phase.PLANNING, source.name)
            rows = parse.parse_datasets((await remote.run(zargv.list_datasets(roots))).text)
            listing = await remote.run(
                zargv.list_snapshots_and_bookmarks(roots, recursive=True)
            )
            snapshots, bookmarks = parse.parse_versions(listing.text)
            selected = select_datasets(self.disk, source, rows)
            await self._ensure_parents(source, selected)
            for index, info in enumerate(selected):
                own = run_snapshot_short_name(info.config, taken_at)
                await self._back_up_dataset(
                    remote, info, up_to(snapshots, info.name, own), bookmarks,
                    index=index, total=len(selected), source=source,
                )

    async def _take_snapshots(self, remote: RemoteHost, source: Source) -> datetime:
        """One atomic ``zfs snapshot`` per kind (recursive or not) over the ``create`` roots.

        Returns the time the names carry. A concurrent session (two disks plugged at once)
        may have taken the same names in the same second: then that snapshot is this run's.
        """
        when = self._now()
        for recursive in (True, False):
            wanted = [
                names.run_snapshot_name(d.root, when, d.snapshot_prefix)
                for d in source.datasets
                if d.snapshots == "create" and d.recursive is recursive
            ]
            if not wanted:
                continue
            self._in_use.protect(wanted, recursive=recursive)  # before it exists: no gap
            try:
                await remote.run(zargv.snapshot(wanted, recursive=recursive))
            except parse.DatasetExists:
                self._log.info(f"server snapshot already taken: {' '.join(wanted)}",
                               snapshots=wanted)
            else:
                self._log.info(f"server snapshot taken: {' '.join(wanted)}", snapshots=wanted)
        return when

    async def _ensure_parents(
        self, source: Source, selected: Sequence[SourceDatasetInfo]
    ) -> None:
        """Receiving needs the target's parent: create missing ancestors, parents first.

        They are empty placeholders (never mounted) encrypted under the pool's key;
        ancestors that are themselves selected arrive by their own receive instead.
        """
        root = self.disk.target_root
        existing = {row.name for row in await self._zfs.list_datasets([self.disk.pool_name])}
        arriving = {info.target for info in selected}
        needed: set[str] = set()
        for info in selected:
            ancestor = info.target.rpartition("/")[0]
            while ancestor and ancestor not in arriving and len(ancestor) >= len(root):
                needed.add(ancestor)
                ancestor = ancestor.rpartition("/")[0]
        for dataset in sorted(needed - existing, key=lambda name: name.count("/")):
            await self._zfs.create_placeholder(dataset)
            self._log.info(f"placeholder {dataset} created", dataset=dataset,
                           source=source.name)

    # -- one dataset -------------------------------------------------------------------------

    async def _disk_state(self, target: str) -> tuple[DatasetState | None, Encryption | None]:
        try:
            state = await self._zfs.dataset_state(target)
        except parse.DatasetNotFound:
            return None, None
        props = await self._zfs.get_properties([target], ["encryptionroot"])
        root = props.get(target, {}).get("encryptionroot")
        received_as = Encryption.ENCRYPTED if root == target else Encryption.PLAIN
        return state, received_as

    async def _back_up_dataset(
        self,
        remote: RemoteHost,
        info: SourceDatasetInfo,
        snapshots: Sequence[Snapshot],
        bookmarks: Sequence[Bookmark],
        *,
        index: int,
        total: int,
        source: Source,
    ) -> None:
        dataset_log = self._log.bind(dataset=info.name, target=info.target)
        server = DatasetState(
            info.name,
            tuple(s for s in snapshots if s.dataset == info.name),
            tuple(b for b in bookmarks if b.dataset == info.name),
        )
        cursor_name = names.cursor_bookmark_name(info.name, self.disk.label)
        cursor = next((b for b in server.bookmarks if b.name == cursor_name), None)
        sent = 0
        outcome = "up to date"
        final: Snapshot | None = None
        try:
            for _ in range(MAX_REPLANS):
                disk, received_as = await self._disk_state(info.target)
                dataset_plan = planner.plan_dataset(
                    server=server,
                    disk=disk,
                    encryption=info.encryption,
                    cursor=cursor,
                    snapshot_filter=snapshot_filter(info.config),
                    disk_encryption=received_as,
                )
                dataset_log.info(f"planned: {dataset_plan.explain()}",
                                 plan=dataset_plan.explain())
                dataset_plan.raise_for_conflict()
                if dataset_plan.is_up_to_date:
                    final = dataset_plan.common_base
                    break
                for step in dataset_plan.transfers:
                    sent += await self._transfer(remote, info, step, index=index, total=total)
                outcome = "sent"
                final = dataset_plan.final_snapshot
                if not dataset_plan.replan_after:
                    break
            if final is not None:
                await self._move_cursor(remote, info, final, cursor)
                await self._prune_server(remote, info, source, final)
            self._enter(Phase.PRUNING, info.target)
            await self._prune(info, final, cursor)
        except planner.PlanConflictError as error:
            outcome = f"conflict: {error}"
            self._tally.problems.append(f"{info.name}: {error}")
            dataset_log.error("dataset needs attention", conflict=str(error))
        except (parse.PoolSuspended, WrongDiskKey):
            raise  # the disk itself is gone or refused: the session ends
        except ZbackupdError as error:
            outcome = f"failed: {error}"
            self._tally.problems.append(f"{info.name}: {error}")
            dataset_log.error("dataset failed", error=str(error),
                              error_type=type(error).__name__, transient=error.transient)
        self._tally.bytes_sent += sent
        self._tally.results.append(
            DatasetResult(info.name, outcome, sent, final.short_name if final else None)
        )

    async def _estimate(
        self, remote: RemoteHost, step: planner.TransferStep, mode: Encryption
    ) -> int | None:
        """``zfs send -nvP``: the size for the ETA; a failed estimate only costs the ETA."""
        try:
            result = await remote.run(send_argv(step, mode, estimate=True))
        except ZbackupdError as error:
            self._log.warning("size estimate failed", error=str(error))
            return None
        try:
            return parse.parse_send_estimate(result.text + "\n" + result.stderr)
        except parse.ParseError:
            return None

    async def _transfer(
        self,
        remote: RemoteHost,
        info: SourceDatasetInfo,
        step: planner.TransferStep,
        *,
        index: int,
        total: int,
    ) -> int:
        if isinstance(step, planner.FullSend) and step.target_exists:
            raise PermanentError(
                f"{info.target} exists on the disk without snapshots; a full receive would "
                "overwrite it: destroy it on the disk to let zbackupd send it afresh"
            )
        estimate = await self._estimate(remote, step, info.encryption)
        tag = names.hold_tag(self.disk.label)
        held = held_snapshot_name(step)
        if held is not None and not isinstance(step, planner.Resume):
            # A resume's snapshot is still held from the interrupted run.
            await self._hold(remote, tag, held)
        self._log.info(f"transfer started: {step.describe()}", dataset=info.name,
                       step=step.describe(),
                       estimated_bytes=estimate)

        def on_progress(sample: TransferProgress) -> None:
            self._enter(
                Phase.TRANSFERRING,
                progress=Progress(info.name, sample.bytes_done, sample.estimated_total,
                                  sample.rate, index, total),
            )

        self._enter(Phase.TRANSFERRING, progress=Progress(info.name, 0, estimate, 0.0,
                                                          index, total))
        try:
            result = await stream(
                remote,
                send_argv(step, info.encryption),
                self._runner,
                zargv.receive(info.target),
                estimated_total=estimate,
                on_progress=on_progress,
            )
        except BaseException:
            if held is not None:
                # The partial receive resumes from this snapshot next time: keep it pinned
                # (a later successful run releases the hold, see server_prune).
                self._log.info(f"transfer interrupted: hold on {held} kept for the resume",
                               dataset=info.name, snapshot=held, tag=tag)
            raise
        if held is not None:
            await remote.run(zargv.release(tag, [held]), check=False)
        self._log.info(
            f"transfer finished: {info.name}, {human_bytes(result.bytes_transferred)} "
            f"in {result.elapsed:.1f}s ({human_bytes(result.rate)}/s)",
            dataset=info.name, step=step.describe(), bytes=result.bytes_transferred,
            seconds=round(result.elapsed, 3),
        )
        return result.bytes_transferred

    async def _hold(self, remote: RemoteHost, tag: str, snapshot: str) -> None:
        """``zfs hold``; a hold this disk already has there (an earlier run) is fine."""
        result = await remote.run(zargv.hold(tag, [snapshot]), check=False)
        if result.returncode != 0 and "tag already exists" not in result.stderr:
            raise parse.classify_error(result.argv, result.returncode, result.stderr)

    async def _move_cursor(
        self,
        remote: RemoteHost,
        info: SourceDatasetInfo,
        final: Snapshot,
        cursor: Bookmark | None,
    ) -> None:
        """Point this disk's bookmark at what the disk now holds (a space-free base)."""
        if cursor is not None and cursor.guid == final.guid:
            return
        server_snapshot = f"{info.name}@{final.short_name}"
        cursor_name = names.cursor_bookmark_name(info.name, self.disk.label)
        if cursor is not None:
            await remote.run(zargv.destroy_bookmark(cursor_name))
        await remote.run(zargv.bookmark(server_snapshot, cursor_name))

    async def _prune_server(
        self,
        remote: RemoteHost,
        info: SourceDatasetInfo,
        source: Source,
        final: Snapshot,
    ) -> None:
        """With the cursor at ``final``: destroy older own snapshots of the dataset on the
        server (``server_prune.py`` says which). A failure only warns: the next run retries."""
        if info.config.snapshots != "create":
            return
        others = other_cursor_short_names(self.config, self.disk, source)
        try:
            decision = await prune_dataset(
                remote,
                info.name,
                OwnSnapshotPolicy(info.config.snapshot_prefix, source.keep_own_snapshots),
                sent=final,
                other_cursor_names=others,
                in_use=self._in_use.others_now,
                own_hold_tag=names.hold_tag(self.disk.label),
            )
        except ServerPruneFailed as error:
            self._log.warning(f"pruning own snapshots of {info.name} on the server failed "
                              f"(the next run tries again): {error.cause}", dataset=info.name,
                              snapshots=list(error.snapshots), error=str(error.cause),
                              error_type=type(error.cause).__name__, transient=error.transient)
            return
        if decision.destroy:
            self._log.info(f"pruned {len(decision.destroy)} own snapshot(s) of {info.name} "
                           "on the server", dataset=info.name,
                           destroyed=list(decision.short_names))

    async def _prune(
        self, info: SourceDatasetInfo, final: Snapshot | None, cursor: Bookmark | None
    ) -> None:
        state, _ = await self._disk_state(info.target)
        if state is None or not state.snapshots:
            return
        keep = protections(
            state.snapshots,
            common_base=next((s for s in state.snapshots if final and s.guid == final.guid),
                             None),
            cursor=cursor,
        )
        decision = select_for_destroy(
            state.snapshots,
            retention_policy(self.config, self.disk),
            now=self._now(),
            protect=keep,
        )
        if decision.destroy:
            doomed = [s.short_name for s in decision.destroy]
            await self._zfs.destroy_snapshots(info.target, doomed)
            self._log.info(f"pruned {len(doomed)} snapshot(s) of {info.target}",
                           dataset=info.target, destroyed=doomed)


def run_snapshot_short_name(config: SourceDataset, taken_at: datetime) -> str | None:
    """The name of this run's own snapshot of a dataset (``create`` mode), else None."""
    if config.snapshots != "create":
        return None
    return names.run_snapshot_short_name(taken_at, config.snapshot_prefix)


def up_to(
    snapshots: Sequence[Snapshot], dataset: str, last_short_name: str | None
) -> tuple[Snapshot, ...]:
    """``dataset``'s part of a listing; with this run's own snapshot named, nothing newer.

    A run sends its own recursive snapshot, one point in time for every dataset, even
    when a concurrent run (another disk) snapshotted again while this one was listing.
    """
    mine = [s for s in snapshots if s.dataset == dataset]
    cut = next((s.createtxg for s in mine if s.short_name == last_short_name), None)
    return tuple(mine) if cut is None else tuple(s for s in mine if s.createtxg <= cut)


def send_argv(
    step: planner.TransferStep, mode: Encryption, *, estimate: bool = False
) -> tuple[str, ...]:
    """The server-side ``zfs send`` for one planned step (``-w`` or ``-L -c`` by ``mode``)."""
    if isinstance(step, planner.Resume):
        return zargv.send_resume(step.token, estimate=estimate)
    if isinstance(step, planner.FullSend):
        return zargv.send_full(step.snapshot.name, mode, estimate=estimate)
    return zargv.send_incremental(
        step.from_.name, step.to.name, mode, intermediates=step.intermediates, estimate=estimate
    )


def held_snapshot_name(step: planner.TransferStep) -> str | None:
    """The server snapshot a step sends up to: held on the server while it travels and,
    if the stream is interrupted, until the resume lands (``zfs send -t`` needs it)."""
    if isinstance(step, planner.FullSend):
        return step.snapshot.name
    if isinstance(step, planner.IncrementalSend):
        return step.to.name
    try:
        return zargv.decode_resume_token(step.token).toname
    except zargv.InvalidArgument:
        return None  # the resume itself reports the bad token
