"""One dataset's replication within a run: plan, transfer each step, move this disk's
cursor, prune the server's own snapshots, then the disk's.

The pure helpers (``steps.py``: ``send_argv``, ``held_snapshot_name``,
``snapshot_filter``, ``retention_policy``, ``read_resume_token``, …) decide;
``DatasetReplication`` carries them out. A dataset's failure is its own (recorded, the
run goes on) unless the disk itself is gone or refused (``PoolSuspended``,
``WrongDiskKey``), which ends the session.

The chain heals itself once per run where it safely can: a partial receive whose resume
cannot work (its snapshot or base gone from the server, an unreadable token, a resume the
server refuses) is aborted (``zfs receive -A``) with a warning saying why, and the dataset
planned afresh; a step that runs out of space prunes this dataset on the disk per policy
(never the common base, the cursor's snapshot or a partial receive's base) and is retried
once, else fails naming the bytes needed and free. Pruning believes the clock only when
it is within two days of the data (``retention.check_clock``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from zbackupd.config import Config, Disk, Source
from zbackupd.core import idle
from zbackupd.core import plan as planner
from zbackupd.core.conflicts import ResumeTokenInfo, ResumeTokenMismatch
from zbackupd.core.model import Bookmark, DatasetState, Snapshot
from zbackupd.core.status import Phase, Progress, human_bytes
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.server.cleanup import clean_up_dataset
from zbackupd.server.prune import InUseLease, OwnSnapshotPolicy, cursors_of, other_disk_labels
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import (
    ProgressCallback,
    TransferProgress,
    TransferResult,
    stream,
)
from zbackupd.service.disk_copy import DiskCopy
from zbackupd.service.pool import WrongDiskKey
from zbackupd.service.source_run import SourceDatasetInfo
from zbackupd.service.steps import (
    causes_of,
    first_line,
    held_snapshot_name,
    mismatch_reason,
    read_resume_token,
    refused_resume,
    retention_policy,
    send_argv,
    snapshot_filter,
    step_target,
)
from zbackupd.service.store import DatasetResult
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import Runner

#: A resume may reveal another resume (a second interrupted stream), an abort or a prune
#: for space asks for a fresh plan: bounded re-planning.
MAX_REPLANS = 6


class Report(Protocol):
    """The session's reporting: a phase, a message and transfer progress."""

    def __call__(
        self, phase: Phase, message: str = "", progress: Progress | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class DatasetOutcome:
    """What one dataset's replication did; ``problem`` is set when it needs attention."""

    result: DatasetResult
    problem: str | None = None


class Streamer(Protocol):
    """``transfer.stream``'s signature: remote send piped into local receive (a
    constructor argument, so tests script transfers without SSH or ZFS)."""

    async def __call__(
        self,
        remote: RemoteHost,
        send_argv: Sequence[str],
        runner: Runner,
        receive_argv: Sequence[str],
        *,
        estimated_total: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TransferResult: ...


class DatasetReplication:
    """One selected dataset of one source onto this run's disk."""

    def __init__(
        self,
        *,
        config: Config,
        disk: Disk,
        source: Source,
        info: SourceDatasetInfo,
        remote: RemoteHost,
        zfs: Zfs,
        runner: Runner,
        in_use: InUseLease,
        now: Callable[[], datetime],
        report: Report,
        log: FilteringBoundLogger,
        index: int,
        total: int,
        streamer: Streamer = stream,
    ) -> None:
        self.config = config
        self.disk = disk
        self.source = source
        self.info = info
        self._remote = remote
        self._zfs = zfs
        self._runner = runner
        self._in_use = in_use
        self._now = now
        self._report = report
        self._log = log
        self._dataset_log = log.bind(dataset=info.name, target=info.target)
        self._copy = DiskCopy(info.target, zfs=zfs, policy=retention_policy(config, disk),
                              now=now, log=self._dataset_log)  # fmt: skip
        self._index = index
        self._total = total
        self._stream = streamer
        #: This disk's cursor bookmarks on the server, oldest first (the last is the cursor);
        #: kept up to date as the cursor moves.
        self._cursors: list[Bookmark] = []
        #: The server's snapshots of this dataset in this run's listing.
        self._server_snapshots: tuple[Snapshot, ...] = ()
        #: The size estimate of the step last started (for an out-of-space message).
        self._estimate_bytes: int | None = None
        #: What a prune for space destroyed (None: none tried; one per run).
        self._pruned_for_space: tuple[str, ...] | None = None
        #: Bytes sent by completed steps; the snapshot the disk holds as its newest.
        self._sent = 0
        self._final: Snapshot | None = None
        #: Up to date with the cursor at the base (``idle.is_settled``): no server work.
        self._settled = False

    @property
    def prefix(self) -> str:
        """The prefix of this dataset's run snapshots, and so of this disk's hold tag and
        cursors on it: the server's gate accepts one prefix (its ``prefix``)."""
        return self.info.config.snapshot_prefix

    async def run(
        self, snapshots: Sequence[Snapshot], bookmarks: Sequence[Bookmark]
    ) -> DatasetOutcome:
        """Replicate up to the newest of ``snapshots`` (this dataset's, this run's cut)."""
        info = self.info
        server = DatasetState(
            info.name,
            tuple(s for s in snapshots if s.dataset == info.name),
            tuple(b for b in bookmarks if b.dataset == info.name),
        )
        self._server_snapshots = server.snapshots
        self._cursors = list(cursors_of(server.bookmarks, self.disk.label, self.prefix))
        problem: str | None = None
        try:
            outcome = await self._replicate(server)
            final = self._final
            if final is not None and not self._settled:
                await self._move_cursor(final)
                await self.prune_server(final)
            self._report(Phase.PRUNING, info.target)
            await self._copy.prune(common_base=final, cursor=self.cursor,
                                   server_snapshots=self._server_snapshots)  # fmt: skip
        except planner.PlanConflictError as error:
            outcome = f"conflict: {error}"
            problem = f"{info.name}: {error}"
            self._dataset_log.error("dataset needs attention", conflict=str(error))
        except (parse.PoolSuspended, WrongDiskKey):
            raise  # the disk itself is gone or refused: the session ends
        except ZbackupdError as error:
            outcome = f"failed: {error}"
            problem = f"{info.name}: {error}"
            self._dataset_log.error("dataset failed", error=str(error),
                                    error_type=type(error).__name__, transient=error.transient)
        final = self._final
        return DatasetOutcome(
            DatasetResult(info.name, outcome, self._sent, final.short_name if final else None),
            problem,
        )

    async def _replicate(self, server: DatasetState) -> str:
        """Plan and transfer until the disk holds the newest selected snapshot (re-planning
        after a resume, an aborted partial receive or a prune for space): "sent" or "up
        to date". ``_final`` is then the server snapshot the disk holds as its newest."""
        outcome = "up to date"
        for _ in range(MAX_REPLANS):
            dataset_plan = await self._plan(server)
            if dataset_plan is None:
                continue  # a partial receive was aborted: plan afresh
            if dataset_plan.is_up_to_date:
                self._final = dataset_plan.common_base
                # Nothing sent and the cursor at the base: nothing to move or prune.
                self._settled = outcome == "up to date" and idle.is_settled(dataset_plan,
                                                                            self._cursors)
                break
            try:
                for step in dataset_plan.transfers:
                    self._sent += await self._transfer(step)
            except (parse.PoolSuspended, WrongDiskKey):
                raise
            except ZbackupdError as error:
                if await self._heal(error, dataset_plan):
                    continue
                raise
            outcome = "sent"
            self._final = dataset_plan.final_snapshot
            if not dataset_plan.replan_after:
                break
        return outcome

    async def _plan(self, server: DatasetState) -> planner.DatasetPlan | None:
        """The plan from the disk as it is now; None when a partial receive that cannot
        be resumed (unreadable token, snapshot or base gone) was aborted instead."""
        disk, received_as = await self._copy.state()
        token_info: ResumeTokenInfo | None = None
        if disk is not None and disk.receive_resume_token:
            read = read_resume_token(disk.receive_resume_token)
            if isinstance(read, str):
                await self._copy.abort_partial(read)
                return None
            token_info = read
        dataset_plan = planner.plan_dataset(
            server=server,
            disk=disk,
            encryption=self.info.encryption,
            cursor=self.cursor,
            snapshot_filter=snapshot_filter(self.info.config),
            resume_token_info=token_info,
            disk_encryption=received_as,
        )
        self._dataset_log.info(f"planned: {dataset_plan.explain()}", plan=dataset_plan.explain())
        if isinstance(dataset_plan.conflict, ResumeTokenMismatch):
            await self._copy.abort_partial(mismatch_reason(dataset_plan.conflict))
            return None
        dataset_plan.raise_for_conflict()
        return dataset_plan

    async def _heal(self, error: ZbackupdError, dataset_plan: planner.DatasetPlan) -> bool:
        """After a failed step: True to plan again (a resume the server refused was
        aborted; an out-of-space step made room by pruning), False to fail with ``error``
        (the cursor then follows what the disk holds)."""
        causes = causes_of(error)
        refused = refused_resume(causes)
        if refused is not None and not self._copy.aborts:
            await self._copy.abort_partial(
                f"the server refused to resume it ({first_line(refused.stderr)})")
            return True
        await self._cursor_to_disk()
        if not any(isinstance(cause, parse.OutOfSpace) for cause in causes):
            return False
        if self._pruned_for_space is None:
            # Per policy, keeping the common base, the cursor's and a partial's base.
            self._pruned_for_space = await self._copy.prune(
                common_base=dataset_plan.common_base, cursor=self.cursor,
                server_snapshots=self._server_snapshots)  # fmt: skip
            if self._pruned_for_space:
                self._dataset_log.warning(
                    f"out of space receiving {self.info.target}: pruned "
                    f"{len(self._pruned_for_space)} snapshot(s) per the retention policy, "
                    "retrying once", destroyed=list(self._pruned_for_space))
                return True
        raise await self._copy.does_not_fit(
            needed=self._estimate_bytes, pruned=self._pruned_for_space or ()) from error

    async def _estimate(self, step: planner.TransferStep) -> int | None:
        """The size for the ETA: from the dataset listing for a one-interval increment to
        this run's snapshot (``idle.listed_increment_size``), else ``zfs send -nvP``; a
        failed estimate only costs the ETA."""
        listed = idle.listed_increment_size(step, self._server_snapshots,
                                            written=self.info.written,
                                            run_snapshot=self.info.run_snapshot)
        if listed is not None:
            return listed
        try:
            result = await self._remote.run(send_argv(step, self.info.encryption, estimate=True))
        except ZbackupdError as error:
            self._log.warning("size estimate failed", error=str(error))
            return None
        try:
            return parse.parse_send_estimate(result.text + "\n" + result.stderr)
        except parse.ParseError:
            return None

    async def _transfer(self, step: planner.TransferStep) -> int:
        info = self.info
        if isinstance(step, planner.FullSend) and step.target_exists:
            raise PermanentError(
                f"{info.target} exists on the disk without snapshots; a full receive would "
                "overwrite it: destroy it on the disk to let zbackupd send it afresh"
            )
        estimate = self._estimate_bytes = await self._estimate(step)
        tag = names.hold_tag(self.disk.label, self.prefix)
        held = held_snapshot_name(step)
        if held is not None and not isinstance(step, planner.Resume):
            # A resume's snapshot is still held from the interrupted run.
            await self._hold(tag, held)
        self._log.info(f"transfer started: {step.describe()}", dataset=info.name,
                       step=step.describe(),
                       estimated_bytes=estimate)

        def on_progress(sample: TransferProgress) -> None:
            self._report(
                Phase.TRANSFERRING,
                progress=Progress(info.name, sample.bytes_done, sample.estimated_total,
                                  sample.rate, self._index, self._total),
            )

        self._report(Phase.TRANSFERRING, progress=Progress(info.name, 0, estimate, 0.0,
                                                           self._index, self._total))
        try:
            result = await self._stream(
                self._remote,
                send_argv(step, info.encryption),
                self._runner,
                zargv.receive(info.target, volume=info.volume),
                estimated_total=estimate,
                on_progress=on_progress,
            )
        except BaseException:
            if held is not None:
                # The partial receive resumes from this snapshot next time: keep it pinned
                # (a later successful run releases the hold, see server/prune.py).
                self._log.info(f"transfer interrupted: hold on {held} kept for the resume",
                               dataset=info.name, snapshot=held, tag=tag)
            raise
        target = step_target(step, self._server_snapshots)
        if target is not None:
            # The disk holds the step's snapshot: the cursor follows each completed step.
            await self._move_cursor(target)
        if held is not None:
            # Only now, with the cursor past it, may the snapshot go.
            await self._remote.run(zargv.release(tag, [held]), check=False)
        self._log.info(
            f"transfer finished: {info.name}, {human_bytes(result.bytes_transferred)} "
            f"in {result.elapsed:.1f}s ({human_bytes(result.rate)}/s)",
            dataset=info.name, step=step.describe(), bytes=result.bytes_transferred,
            seconds=round(result.elapsed, 3),
        )
        return result.bytes_transferred

    async def _hold(self, tag: str, snapshot: str) -> None:
        """``zfs hold``; a hold this disk already has there (an earlier run) is fine."""
        result = await self._remote.run(zargv.hold(tag, [snapshot]), check=False)
        if result.returncode != 0 and "tag already exists" not in result.stderr:
            raise parse.classify_error(result.argv, result.returncode, result.stderr)

    @property
    def cursor(self) -> Bookmark | None:
        """This disk's cursor on the server: the newest of its cursor bookmarks."""
        return self._cursors[-1] if self._cursors else None

    async def _cursor_to_disk(self) -> None:
        """After a failed step: point the cursor at the newest snapshot the disk shares with
        the server, if that is newer than the cursor (an ``-I`` stream cut midway leaves
        the snapshots before the cut). A failure here only warns: the step's is the error."""
        try:
            disk, _ = await self._copy.state()
            if disk is None:
                return
            base = planner.newest_common_snapshot(self._server_snapshots, (), disk.snapshots)
            on_server = next(
                (s for s in self._server_snapshots if base is not None and s.guid == base.guid),
                None,
            )
            cursor = self.cursor
            if on_server is not None and (cursor is None or on_server.createtxg > cursor.createtxg):
                await self._move_cursor(on_server)
        except (parse.PoolSuspended, WrongDiskKey):
            raise
        except ZbackupdError as error:
            self._dataset_log.warning(f"cursor not moved after the failed transfer: {error}",
                                      error=str(error), error_type=type(error).__name__)

    async def _move_cursor(self, to: Snapshot) -> None:
        """Point this disk's cursor at ``to`` (what the disk now holds: a space-free base).

        The new bookmark is made first, under its own name (``<prefix>_<label>:<guid>``),
        and only then are this disk's other cursor bookmarks destroyed: a crash in between
        leaves two cursors (the newest counts), never none. A failed clean-up only warns.
        """
        info = self.info
        current = self.cursor
        if current is None or current.guid != to.guid:
            on_server = next((s for s in self._server_snapshots if s.guid == to.guid), None)
            if on_server is None:
                self._dataset_log.warning(
                    f"cursor not moved: {to.short_name} (guid {to.guid}) is no longer a "
                    f"snapshot of {info.name} on the server", snapshot=to.name, guid=to.guid)
                return
            name = names.cursor_bookmark_name(info.name, self.disk.label, self.prefix,
                                              guid=on_server.guid)
            if all(mark.name != name for mark in self._cursors):
                await self._remote.run(zargv.bookmark(on_server.name, name))
            current = Bookmark(name, on_server.guid, on_server.createtxg, on_server.creation)
            self._cursors = [m for m in self._cursors if m.name != name] + [current]
        for old in [m for m in self._cursors if m.name != current.name]:
            try:
                await self._remote.run(zargv.destroy_bookmark(old.name))
            except ZbackupdError as error:
                self._dataset_log.warning(
                    f"old cursor {old.name} not destroyed (the newest counts; the next move "
                    f"tries again): {error}", bookmark=old.name, error=str(error))
                continue
            self._cursors.remove(old)

    async def prune_server(self, final: Snapshot) -> None:
        """With the cursor at ``final``: release this disk's stale holds (every mode), then
        destroy older own snapshots of the dataset on the server (``create`` mode;
        ``server/prune.py`` decides), over one listing and one ``zfs holds``
        (``server/cleanup.py``). A failure only warns: the next run tries again."""
        info = self.info
        tag = names.hold_tag(self.disk.label, self.prefix)
        create = info.config.snapshots == "create"
        done = await clean_up_dataset(
            self._remote, info.name, tag, sent=final,
            policy=(OwnSnapshotPolicy(info.config.snapshot_prefix,
                                      self.source.keep_own_snapshots) if create else None),
            other_disks=other_disk_labels(self.config, self.disk, self.source),
            in_use=self._in_use.others_now, cursor_prefix=self.prefix,
        )  # fmt: skip
        failures = [(done.release_failed, "releasing stale holds on")]
        if done.prune_failed is not done.release_failed:  # a failed listing: said once
            failures.append((done.prune_failed, "pruning own snapshots of"))
        for failed, what in failures:
            if failed is not None:
                self._log.warning(f"{what} {info.name} on the server failed (the next run "
                                  f"tries again): {failed.cause}", dataset=info.name,
                                  snapshots=list(failed.snapshots), error=str(failed.cause),
                                  error_type=type(failed.cause).__name__,
                                  transient=failed.transient)  # fmt: skip
        if done.released:
            self._log.info(f"released {len(done.released)} stale hold(s) {tag} on {info.name}",
                           dataset=info.name, snapshots=list(done.released), tag=tag)
        decision = done.decision
        if decision is not None and decision.destroy and done.prune_failed is None:
            self._log.info(f"pruned {len(decision.destroy)} own snapshot(s) of {info.name} "
                           "on the server", dataset=info.name,
                           destroyed=list(decision.short_names))
