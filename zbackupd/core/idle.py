"""Shortcuts for what did not change (issue 16): pure decisions that spare server round
trips without changing what reaches the disk.

- ``needs_run_snapshot``: a ``create``-mode dataset with nothing written since its newest
  snapshot gets no new run snapshot when that newest snapshot is itself a send target:
  the planner sends it where it is missing, and a disk that holds it is up to date.
- ``listed_increment_size``: the size of a one-interval increment to this run's snapshot
  is the ``written`` the dataset listing showed just before the snapshot was taken; no
  ``zfs send -nvP`` needed for the ETA.
- ``is_settled``: an up-to-date plan whose cursor is already at the common base needs no
  cursor move, no hold release and no server prune.
"""

from __future__ import annotations

from collections.abc import Sequence

from zbackupd.core.model import Bookmark, DatasetState, Snapshot
from zbackupd.core.plan import DatasetPlan, FullSend, IncrementalSend, SnapshotFilter, TransferStep


def newest_snapshot(state: DatasetState | None) -> Snapshot | None:
    """The newest (createtxg) of a server dataset's snapshots, None if it has none."""
    if state is None or not state.snapshots:
        return None
    return max(state.snapshots, key=lambda snap: (snap.createtxg, snap.guid))


def needs_run_snapshot(
    state: DatasetState | None, written: int | None, targets: SnapshotFilter
) -> bool:
    """Whether a ``create``-mode dataset needs this run's snapshot.

    ``state`` is the dataset's part of a listing taken before the snapshot, ``written``
    the listing's ``written`` (bytes since the newest snapshot; None: unknown) and
    ``targets`` the planner's filter of send targets. Only a dataset with nothing written
    whose newest snapshot is a send target is spared: its newest snapshot is what the run
    would send anyway (a disk without it still gets it: the planner sends it).
    """
    if written is None or written > 0:
        return True
    newest = newest_snapshot(state)
    return newest is None or not targets.matches(newest)


def listed_increment_size(
    step: TransferStep,
    server_snapshots: Sequence[Snapshot],
    *,
    written: int | None,
    run_snapshot: str | None,
) -> int | None:
    """The stream size of ``step`` as the dataset listing tells it, None when it does not.

    It does when the step ends at this run's own snapshot (``run_snapshot``, its short
    name, taken right after the listing showed ``written``) and starts where that
    ``written`` was counted from: the snapshot just before it on the server (or a bookmark
    of that snapshot), or, for a full send, nothing before it at all (``written`` is then
    everything referenced). Compressed and raw streams carry about what is allocated.
    """
    if written is None or run_snapshot is None:
        return None
    if isinstance(step, FullSend):
        start: Snapshot | Bookmark | None = None
        target = step.snapshot
    elif isinstance(step, IncrementalSend):
        start, target = step.from_, step.to
    else:
        return None
    if target.short_name != run_snapshot:
        return None
    before = [s for s in server_snapshots if s.createtxg < target.createtxg]
    previous = max(before, key=lambda snap: (snap.createtxg, snap.guid), default=None)
    if start is None:
        return written if previous is None else None
    return written if previous is not None and previous.guid == start.guid else None


def is_settled(plan: DatasetPlan, cursors: Sequence[Bookmark]) -> bool:
    """An up-to-date plan with this disk's one cursor bookmark at the common base: the
    run has nothing to move, release or prune for this dataset."""
    base = plan.common_base
    return (
        plan.is_up_to_date
        and base is not None
        and len(cursors) == 1
        and cursors[0].guid == base.guid
    )
