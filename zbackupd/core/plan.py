"""The pure replication planner: what to send to bring one dataset on a disk up to date.

Modelled on zrepl's ``replication/logic/diff``. Snapshots on the server and on the disk are
matched by **guid** and each side is ordered by its **own** ``createtxg`` (txgs of two
pools are unrelated numbers, so they are never compared across sides). Names are only for
humans: a renamed snapshot still matches, a same-named snapshot with another guid does not.

The planner never asks for a rollback (``zfs receive -F``): anything that would need one
is reported as a typed conflict that carries the facts to explain it (``conflicts.py``).
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from zbackupd.core.conflicts import (
    Conflict,
    Diverged,
    EncryptionModeMismatch,
    NoCommonSnapshot,
    NoSourceSnapshot,
    ResumeTokenInfo,
    ResumeTokenMismatch,
    TargetModified,
)
from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot
from zbackupd.errors import PermanentError, ZbackupdError

# --------------------------------------------------------------------------- policy


class SendPolicy(Enum):
    """Which server snapshots between the common base and the newest one reach the disk."""

    ALL_INTERMEDIATES = "all"  # one `-I` stream: every server snapshot in between
    NEWEST_ONLY = "newest"  # one `-i` stream straight to the newest selected snapshot
    SELECTED = "selected"  # a chain of `-i` streams through each selected snapshot


@dataclass(frozen=True, slots=True)
class SnapshotFilter:
    """Which server snapshots may be the target of a send.

    A snapshot is selected when its short name starts with ``own_prefix`` (zbackupd's own
    snapshots) or matches one of ``reuse_patterns`` (``fnmatch`` globs, e.g. sanoid's
    ``autosnap_*_daily``). With neither set, every snapshot is selected. The filter only
    chooses targets: the common base is found among *all* snapshots and bookmarks, and an
    ``-I`` stream carries every snapshot in between whatever its name.
    """

    own_prefix: str | None = None
    reuse_patterns: tuple[str, ...] = ()

    def matches(self, snapshot: Snapshot) -> bool:
        if self.own_prefix is None and not self.reuse_patterns:
            return True
        short = snapshot.short_name
        if self.own_prefix is not None and short.startswith(self.own_prefix):
            return True
        return any(fnmatch.fnmatchcase(short, pattern) for pattern in self.reuse_patterns)


SELECT_ALL = SnapshotFilter()


_Version = TypeVar("_Version", Snapshot, Bookmark)


def by_txg(items: Iterable[_Version]) -> tuple[_Version, ...]:
    """Sort one side's snapshots or bookmarks oldest first (by that side's createtxg)."""
    return tuple(sorted(items, key=lambda item: (item.createtxg, item.guid)))


def select_sendable(
    snapshots: Iterable[Snapshot], snapshot_filter: SnapshotFilter = SELECT_ALL
) -> tuple[Snapshot, ...]:
    """The server snapshots the filter allows as send targets, oldest first."""
    return tuple(snap for snap in by_txg(snapshots) if snapshot_filter.matches(snap))


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Resume:
    """Finish a partial receive with ``zfs send -t <token>``; re-plan afterwards."""

    token: str

    def describe(self) -> str:
        return f"resume the interrupted receive (token {self.token[:16]}…)"


@dataclass(frozen=True, slots=True)
class FullSend:
    """A full stream of ``snapshot``: the disk has no snapshot of this dataset yet.

    ``target_exists`` says the dataset exists on the disk (with no snapshots); receiving a
    full stream into it needs a decision the planner leaves to the caller.
    """

    snapshot: Snapshot
    target_exists: bool = False

    def describe(self) -> str:
        where = " into the existing empty dataset" if self.target_exists else ""
        return f"full send of {self.snapshot.name}{where}"


class PlanInvariantError(PermanentError):
    """A step was built that ZFS cannot execute: a bug in the caller, not the data."""


@dataclass(frozen=True, slots=True)
class IncrementalSend:
    """``zfs send -I from to`` (``intermediates``) or ``zfs send -i from to``.

    ``from_`` is the server-side name of the common base (a bookmark only with ``-i``).
    """

    from_: Snapshot | Bookmark
    to: Snapshot
    intermediates: bool

    def __post_init__(self) -> None:
        if self.intermediates and isinstance(self.from_, Bookmark):
            raise PlanInvariantError(
                f"-I cannot start from bookmark {self.from_.name}; use -i from a bookmark"
            )
        if self.from_.guid == self.to.guid:
            raise PlanInvariantError(f"incremental from {self.from_.name} to itself")

    def describe(self) -> str:
        flag = "-I" if self.intermediates else "-i"
        return f"incremental send {flag} {self.from_.name} {self.to.name}"


@dataclass(frozen=True, slots=True)
class UpToDate:
    """Nothing to send: the disk already holds ``snapshot``.

    Named as on the server while the server still has it, else as on the disk.
    """

    snapshot: Snapshot

    def describe(self) -> str:
        return f"up to date at {self.snapshot.name}"


TransferStep = Resume | FullSend | IncrementalSend
Step = TransferStep | UpToDate


# --------------------------------------------------------------------------- conflicts


class PlanConflictError(ZbackupdError):
    """A dataset cannot be brought up to date without a human; carries the conflict
    (one of ``conflicts.py``'s typed records)."""

    def __init__(self, conflict: Conflict) -> None:
        self.conflict = conflict
        self.transient = conflict.transient
        super().__init__(conflict.explain())


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class DatasetPlan:
    """The outcome for one dataset: transfer steps, up to date, or a conflict.

    ``common_base`` is the disk's newest snapshot shared with the server (retention must
    keep it); ``final_snapshot`` is the server snapshot the disk will hold as its newest
    once the steps succeed (where this disk's cursor bookmark should then point), ``None``
    when a resume must run first or on conflict.
    """

    dataset: str
    encryption: Encryption
    steps: tuple[Step, ...] = ()
    conflict: Conflict | None = None
    common_base: Snapshot | None = None
    final_snapshot: Snapshot | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_conflict(self) -> bool:
        return self.conflict is not None

    @property
    def is_up_to_date(self) -> bool:
        return self.conflict is None and all(isinstance(s, UpToDate) for s in self.steps)

    @property
    def transfers(self) -> tuple[TransferStep, ...]:
        return tuple(step for step in self.steps if not isinstance(step, UpToDate))

    @property
    def replan_after(self) -> bool:
        """A resume changes the disk in ways only a fresh listing shows: plan again."""
        return any(isinstance(step, Resume) for step in self.steps)

    def raise_for_conflict(self) -> None:
        if self.conflict is not None:
            raise PlanConflictError(self.conflict)

    def explain(self) -> str:
        """One human paragraph: what will happen and why (for `zbackupd plan` and logs)."""
        mode = "raw" if self.encryption is Encryption.ENCRYPTED else "compressed, non-raw"
        if self.conflict is not None:
            lines = [f"CONFLICT: {self.conflict.explain()}"]
        elif self.is_up_to_date:
            lines = [f"{self.dataset}: " + "; ".join(s.describe() for s in self.steps)]
        else:
            lines = [f"{self.dataset} ({mode}):"]
            lines += [f"  {n}. {s.describe()}" for n, s in enumerate(self.steps, start=1)]
            if self.replan_after:
                lines.append("  then list the disk again and plan the rest")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def newest_common_snapshot(
    server_snapshots: Iterable[Snapshot],
    server_bookmarks: Iterable[Bookmark],
    disk_snapshots: Iterable[Snapshot],
) -> Snapshot | None:
    """The disk's newest snapshot whose guid the server still has (snapshot or bookmark)."""
    server_guids = {s.guid for s in server_snapshots} | {b.guid for b in server_bookmarks}
    shared = [snap for snap in by_txg(disk_snapshots) if snap.guid in server_guids]
    return shared[-1] if shared else None


def _check_resume_token(
    dataset: str,
    info: ResumeTokenInfo,
    server_snapshots: Sequence[Snapshot],
    server_bookmarks: Sequence[Bookmark],
) -> ResumeTokenMismatch | None:
    snapshot_guids = {snap.guid for snap in server_snapshots}
    if info.to_guid not in snapshot_guids:
        return ResumeTokenMismatch(dataset, info, info.to_guid, "target")
    source_guids = snapshot_guids | {mark.guid for mark in server_bookmarks}
    if info.from_guid is not None and info.from_guid not in source_guids:
        return ResumeTokenMismatch(dataset, info, info.from_guid, "source")
    return None


def _full_send_steps(
    sendable: tuple[Snapshot, ...],
    policy: SendPolicy,
    *,
    target_exists: bool,
) -> tuple[TransferStep, ...]:
    newest = sendable[-1]
    if policy is SendPolicy.NEWEST_ONLY or len(sendable) == 1:
        return (FullSend(newest, target_exists=target_exists),)
    first: TransferStep = FullSend(sendable[0], target_exists=target_exists)
    if policy is SendPolicy.SELECTED:
        return (
            first,
            *(
                IncrementalSend(older, newer, intermediates=False)
                for older, newer in itertools.pairwise(sendable)
            ),
        )
    # ALL_INTERMEDIATES: the oldest selected snapshot in full, then one -I stream that
    # carries every server snapshot up to the newest.
    return (first, IncrementalSend(sendable[0], newest, intermediates=True))


def _incremental_steps(
    base: Snapshot | Bookmark,
    newer_sendable: tuple[Snapshot, ...],
    newer_server: tuple[Snapshot, ...],
    policy: SendPolicy,
) -> tuple[IncrementalSend, ...]:
    """Steps from the server-side ``base`` to ``newer_sendable[-1]``.

    ``newer_server`` holds every server snapshot newer than the base up to that target.
    """
    target = newer_sendable[-1]
    if policy is SendPolicy.NEWEST_ONLY:
        return (IncrementalSend(base, target, intermediates=False),)
    if policy is SendPolicy.SELECTED:
        steps = [IncrementalSend(base, newer_sendable[0], intermediates=False)]
        steps += [
            IncrementalSend(older, newer, intermediates=False)
            for older, newer in itertools.pairwise(newer_sendable)
        ]
        return tuple(steps)
    # ALL_INTERMEDIATES: -I needs a snapshot as its source; from a bookmark, first -i to
    # the next server snapshot, then -I from there.
    if isinstance(base, Bookmark):
        first = newer_server[0]
        steps = [IncrementalSend(base, first, intermediates=False)]
        if first.guid != target.guid:
            steps.append(IncrementalSend(first, target, intermediates=True))
        return tuple(steps)
    return (IncrementalSend(base, target, intermediates=True),)


@dataclass(frozen=True, slots=True)
class _Sides:
    """The planner's inputs, normalised: each side sorted by its own createtxg."""

    dataset: str
    encryption: Encryption
    server_snapshots: tuple[Snapshot, ...]
    server_bookmarks: tuple[Bookmark, ...]
    sendable: tuple[Snapshot, ...]
    disk: DatasetState | None
    disk_snapshots: tuple[Snapshot, ...]
    cursor: Bookmark | None
    policy: SendPolicy

    def plan(
        self,
        *,
        steps: tuple[Step, ...] = (),
        conflict: Conflict | None = None,
        common_base: Snapshot | None = None,
        final_snapshot: Snapshot | None = None,
        notes: tuple[str, ...] = (),
    ) -> DatasetPlan:
        return DatasetPlan(
            self.dataset, self.encryption, steps, conflict, common_base, final_snapshot, notes
        )

    def server_counterpart(self, base_on_disk: Snapshot) -> Snapshot | Bookmark:
        """The server's name for the base: the snapshot if it still exists, else a
        bookmark with its guid (this disk's cursor first)."""
        for snap in self.server_snapshots:
            if snap.guid == base_on_disk.guid:
                return snap
        marks = [mark for mark in self.server_bookmarks if mark.guid == base_on_disk.guid]
        preferred = [m for m in marks if self.cursor is not None and m.name == self.cursor.name]
        return (preferred or marks)[0]


def plan_dataset(
    *,
    server: DatasetState,
    disk: DatasetState | None,
    encryption: Encryption,
    cursor: Bookmark | None = None,
    policy: SendPolicy = SendPolicy.ALL_INTERMEDIATES,
    snapshot_filter: SnapshotFilter = SELECT_ALL,
    resume_token_info: ResumeTokenInfo | None = None,
    disk_encryption: Encryption | None = None,
) -> DatasetPlan:
    """Plan one dataset. ``disk`` is ``None`` when the dataset does not exist on the disk.

    ``cursor`` is this disk's bookmark on the server (what it last received); when the
    common base survives on the server only as bookmarks, the cursor is preferred.
    ``resume_token_info``, when known, lets the planner refuse a resume that cannot work.
    ``disk_encryption`` is how the disk's copy was received, when known (its own
    encryption root: ``ENCRYPTED``, i.e. raw; the pool as encryption root: ``PLAIN``).
    """
    server_snapshots = by_txg(server.snapshots)
    bookmarks = {mark.name: mark for mark in server.bookmarks}
    if cursor is not None:
        bookmarks.setdefault(cursor.name, cursor)
    sides = _Sides(
        dataset=server.name,
        encryption=encryption,
        server_snapshots=server_snapshots,
        server_bookmarks=by_txg(bookmarks.values()),
        sendable=select_sendable(server_snapshots, snapshot_filter),
        disk=disk,
        disk_snapshots=by_txg(disk.snapshots) if disk is not None else (),
        cursor=cursor,
        policy=policy,
    )

    # 1. A partial receive blocks every other receive: finish it first, then re-plan.
    if disk is not None and disk.receive_resume_token:
        if resume_token_info is not None:
            mismatch = _check_resume_token(
                sides.dataset, resume_token_info, server_snapshots, sides.server_bookmarks
            )
            if mismatch is not None:
                return sides.plan(conflict=mismatch)
        return sides.plan(steps=(Resume(disk.receive_resume_token),))

    if disk is not None and disk_encryption is not None and disk_encryption is not encryption:
        return sides.plan(
            conflict=EncryptionModeMismatch(sides.dataset, encryption, disk_encryption)
        )

    # 2. Nothing on the disk yet: a full send.
    if not sides.disk_snapshots:
        if not sides.sendable:
            return sides.plan(conflict=NoSourceSnapshot(sides.dataset, len(server_snapshots)))
        return sides.plan(
            steps=_full_send_steps(sides.sendable, policy, target_exists=disk is not None),
            final_snapshot=sides.sendable[-1],
        )
    return _plan_incremental(sides)


def _plan_incremental(sides: _Sides) -> DatasetPlan:
    """The disk has snapshots: find the common base by guid and send what is newer."""
    dataset, disk_snapshots = sides.dataset, sides.disk_snapshots
    disk_newest = disk_snapshots[-1]
    base_on_disk = newest_common_snapshot(
        sides.server_snapshots, sides.server_bookmarks, disk_snapshots
    )
    if base_on_disk is None:
        return sides.plan(
            conflict=NoCommonSnapshot(
                dataset,
                server_newest=sides.server_snapshots[-1] if sides.server_snapshots else None,
                server_newest_bookmark=(
                    sides.server_bookmarks[-1] if sides.server_bookmarks else None
                ),
                disk_newest=disk_newest,
                cursor=sides.cursor,  # its guid is on no disk snapshot, or it would be common
            )
        )

    server_base = sides.server_counterpart(base_on_disk)
    newer_on_server = tuple(
        s for s in sides.server_snapshots if s.createtxg > server_base.createtxg
    )
    newer_sendable = tuple(s for s in sides.sendable if s.createtxg > server_base.createtxg)

    # Disk snapshots newer than the base are unknown to the server: diverged.
    if disk_newest.guid != base_on_disk.guid:
        disk_only = tuple(s for s in disk_snapshots if s.createtxg > base_on_disk.createtxg)
        return sides.plan(
            conflict=Diverged(dataset, base_on_disk, disk_only, newer_on_server),
            common_base=base_on_disk,
        )

    notes: tuple[str, ...] = ()
    if sides.cursor is not None and sides.cursor.guid != base_on_disk.guid:
        notes = (
            f"cursor {sides.cursor.name} (guid {sides.cursor.guid}) is not at the common "
            f"base {base_on_disk.name}; move it after this run",
        )

    if not newer_sendable:
        up_to = server_base if isinstance(server_base, Snapshot) else base_on_disk
        return sides.plan(
            steps=(UpToDate(up_to),), common_base=base_on_disk, final_snapshot=up_to, notes=notes
        )

    # Only now does a modified target matter: it would make the receive fail.
    written = sides.disk.written_since_last_snapshot if sides.disk is not None else 0
    if written > 0:
        return sides.plan(
            conflict=TargetModified(dataset, disk_newest, written), common_base=base_on_disk
        )

    target = newer_sendable[-1]
    newer_up_to_target = tuple(s for s in newer_on_server if s.createtxg <= target.createtxg)
    return sides.plan(
        steps=_incremental_steps(server_base, newer_sendable, newer_up_to_target, sides.policy),
        common_base=base_on_disk,
        final_snapshot=target,
        notes=notes,
    )
