"""One dataset's copy on the disk, beyond receiving into it: its state for the planner,
discarding a partial receive that cannot be resumed, and pruning it per the retention
policy (after a run, or to make room for a step that ran out of space).

Pruning believes the clock only when it is within ``retention.CLOCK_IMPLAUSIBLE`` of the
data (``check_clock``); it never destroys the newest snapshot shared with the server,
this disk's cursor's snapshot or the base of a partial receive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from structlog.typing import FilteringBoundLogger

from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot
from zbackupd.core.retention import (
    RetentionPolicy,
    check_clock,
    protections,
    select_for_destroy,
)
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.service.pool import WrongDiskKey
from zbackupd.service.steps import ReceiveDoesNotFit, abort_message, resume_base_guids
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs


class DiskCopy:
    """``target`` on this run's disk (``zfs`` the local facade)."""

    def __init__(
        self,
        target: str,
        *,
        zfs: Zfs,
        policy: RetentionPolicy,
        now: Callable[[], datetime],
        log: FilteringBoundLogger,
    ) -> None:
        self.target = target
        self._zfs = zfs
        self._policy = policy
        self._now = now
        self._log = log
        #: Partial receives aborted in this run (one at most: abort + re-plan once).
        self.aborts = 0

    async def state(self) -> tuple[DatasetState | None, Encryption | None]:
        """The copy's state and how it was received (None, None: not on the disk)."""
        target = self.target
        try:
            state = await self._zfs.dataset_state(target)
        except parse.DatasetNotFound:
            return None, None
        props = await self._zfs.get_properties([target], ["encryptionroot"])
        root = props.get(target, {}).get("encryptionroot")
        received_as = Encryption.ENCRYPTED if root == target else Encryption.PLAIN
        return state, received_as

    async def abort_partial(self, reason: str) -> None:
        """``zfs receive -A``: discard a partial receive that cannot be resumed (once per
        run), with a warning that says which dataset and why."""
        if self.aborts:
            raise PermanentError(f"partial receive of {self.target} cannot be resumed "
                                 f"({reason}) and was already aborted once in this run")
        self.aborts += 1
        await self._zfs.receive_abort(self.target)
        self._log.warning(abort_message(self.target, reason), reason=reason)

    async def prune(
        self,
        *,
        common_base: Snapshot | None,
        cursor: Bookmark | None,
        server_snapshots: Sequence[Snapshot],
    ) -> tuple[str, ...]:
        """Destroy what the policy lets go (``common_base``: the server snapshot the disk
        holds as its newest shared one); the short names destroyed."""
        state, _ = await self.state()
        if state is None or not state.snapshots:
            return ()
        base = next((s for s in state.snapshots
                     if common_base is not None and s.guid == common_base.guid), None)  # fmt: skip
        keep = protections(state.snapshots, common_base=base, cursor=cursor)
        for guid in resume_base_guids(state.receive_resume_token):
            keep.setdefault(guid, "the base of the partial receive")
        now = self._now()
        wrong = check_clock(
            now,
            newest_disk=max((s.creation for s in state.snapshots), default=None),
            newest_server=max((s.creation for s in server_snapshots), default=None),
        )
        if wrong is not None:
            self._log.warning(f"{self.target}: {wrong.explain()}", now=now.isoformat(),
                              newest=wrong.newest.isoformat())  # fmt: skip
            return ()
        decision = select_for_destroy(state.snapshots, self._policy, now=now, protect=keep)
        doomed = tuple(s.short_name for s in decision.destroy)
        if doomed:
            await self._zfs.destroy_snapshots(self.target, doomed)
            self._log.info(f"pruned {len(doomed)} snapshot(s) of {self.target}",
                           destroyed=list(doomed))  # fmt: skip
        return doomed

    async def does_not_fit(
        self, *, needed: int | None, pruned: Sequence[str]
    ) -> ReceiveDoesNotFit:
        """The error of a step that does not fit: with the pool's free bytes (``zfs get
        available`` on its root dataset), when they can be read."""
        pool = self.target.partition("/")[0]
        available: int | None
        try:
            available = await self._zfs.available_bytes(pool)
        except (parse.PoolSuspended, WrongDiskKey):
            raise
        except ZbackupdError as error:
            self._log.warning(f"free space of {pool} unknown: {error}", error=str(error))
            available = None
        return ReceiveDoesNotFit(self.target, pool, needed=needed, available=available,
                                 pruned=pruned)  # fmt: skip
