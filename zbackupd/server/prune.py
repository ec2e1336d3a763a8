"""Which of zbackupd's own snapshots on the SERVER to destroy after a run, and the
registry of server snapshots this daemon's running sessions rely on.

Every run in ``snapshots = "create"`` mode takes ``<prefix>_YYYYMMDDTHHMMSSZ`` on the
server. Once a disk's cursor bookmark points at what the disk holds, older run snapshots
are not needed for that disk's next incremental (a bookmark is a valid ``-i`` source, also
after its snapshot is destroyed). ``select_own_for_destroy`` (pure) says which to destroy;
``server/cleanup.py`` (shell) asks the server for holds and issues one ``zfs destroy
ds@a,b,c``.

An own snapshot of one dataset is destroyed only when ALL of these hold:

- its short name is exactly ``<prefix>_YYYYMMDDTHHMMSSZ`` (``names.is_own_snapshot``):
  sanoid's, users' and reused snapshots are never touched;
- it is older (createtxg) than the snapshot this run just sent, which itself stays:
  nothing this run did not see through is destroyed;
- it is not one of the newest ``keep`` own snapshots of the dataset;
- it carries no hold (``zfs holds``), whoever placed it;
- no running session of this daemon relies on it (``InUseRegistry``): another disk's run
  may have taken it and not yet held or sent it;
- it is older than every OTHER configured disk's cursor on the dataset: a snapshot at or
  after another disk's cursor may still be on its way to that disk (a partial receive
  waiting for ``zfs send -t``, whose target must exist; or a transfer whose cursor move
  failed). Such snapshots go once that disk has backed up again. The cursors are read
  from a listing taken at prune time: a disk whose concurrent run has just finished has
  its cursor on its newest snapshot, which therefore stays. A disk's cursor is the newest
  of its cursor bookmarks (``names.is_cursor_of``: ``<prefix>_<label>`` or
  ``<prefix>_<label>:<guid>``; a move creates the new one before destroying the old).

Retention on the disks is ``retention.py``'s business: a different policy (a calendar
grid) over different snapshots (the disk's).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from zbackupd.config import Config, Disk, Source
from zbackupd.core.model import Bookmark, Snapshot
from zbackupd.core.retention import KeptSnapshot, explain_partition
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.zfs import names
from zbackupd.zfs.runner import CommandResult


class ServerPruneInputError(PermanentError):
    """An input the decision cannot be made on (a bug in the caller or a bad config)."""

    def __init__(self, what: str, value: object, why: str) -> None:
        self.what = what
        self.value = value
        super().__init__(f"server prune {what}={value!r}: {why}")


class ServerPruneFailed(ZbackupdError):
    """Asking for holds or destroying on the server failed; nothing is lost, the next
    run tries again. ``snapshots`` are the ones that were to be destroyed."""

    def __init__(self, dataset: str, snapshots: Sequence[str], cause: ZbackupdError) -> None:
        self.dataset = dataset
        self.snapshots = tuple(snapshots)
        self.cause = cause
        self.transient = cause.transient
        super().__init__(
            f"pruning {len(self.snapshots)} own snapshot(s) of {dataset} on the server "
            f"failed: {cause}"
        )


# -- the decision (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnSnapshotPolicy:
    """Whose snapshots are zbackupd's (``prefix``) and how many of the newest stay."""

    prefix: str = names.DEFAULT_PREFIX
    keep: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ServerPruneInputError("keep", self.keep, "must be a whole number >= 1")
        try:
            names.validate_prefix(self.prefix)
        except names.InvalidName as error:
            raise ServerPruneInputError("prefix", self.prefix, error.reason) from None


@dataclass(frozen=True, slots=True)
class ServerPruneDecision:
    """The dataset's own snapshots, split: ``destroy`` and ``keep`` (each with its
    reasons), both oldest first. Snapshots that are not zbackupd's appear in neither."""

    dataset: str
    destroy: tuple[Snapshot, ...]
    keep: tuple[KeptSnapshot, ...]

    @property
    def short_names(self) -> tuple[str, ...]:
        return tuple(snap.short_name for snap in self.destroy)

    def explain(self) -> str:
        return explain_partition(self.keep, self.destroy)


def select_own_for_destroy(
    dataset: str,
    snapshots: Iterable[Snapshot],
    policy: OwnSnapshotPolicy,
    *,
    sent: Snapshot | None,
    held: Collection[str] = frozenset(),
    in_use: Collection[str] = frozenset(),
    other_cursors: Iterable[Bookmark] = (),
) -> ServerPruneDecision:
    """Which own snapshots of ``dataset`` (server side) to destroy; see the module doc.

    ``snapshots`` is the server's listing of this one dataset; ``sent`` the snapshot this
    run sent or found up to date, matched by guid in that listing (not found, or None:
    nothing is destroyed). ``held`` and ``in_use`` are full snapshot names;
    ``other_cursors`` the other configured disks' cursor bookmarks on this dataset.
    """
    listing = tuple(snapshots)
    cursors = tuple(other_cursors)
    strangers = [s.name for s in listing if s.dataset != dataset]
    strangers += [b.name for b in cursors if b.dataset != dataset]
    if strangers:
        raise ServerPruneInputError("snapshots", strangers[:3], f"not of dataset {dataset}")
    own = sorted(
        (s for s in listing if names.is_own_snapshot(s.short_name, policy.prefix)),
        key=lambda snap: (snap.createtxg, snap.guid),
    )
    sent_here = next((s for s in listing if sent is not None and s.guid == sent.guid), None)
    oldest_cursor = min((b.createtxg for b in cursors), default=None)
    newest = {snap.guid: rank for rank, snap in enumerate(reversed(own), start=1)}

    keep: list[KeptSnapshot] = []
    destroy: list[Snapshot] = []
    for snap in own:
        reasons: list[str] = []
        if sent_here is None:
            reasons.append("this run's sent snapshot is not in the listing")
        elif snap.guid == sent_here.guid:
            reasons.append("sent by this run")
        elif snap.createtxg >= sent_here.createtxg:
            reasons.append("newer than this run's snapshot")
        if newest[snap.guid] <= policy.keep:
            reasons.append(f"newest {newest[snap.guid]}/{policy.keep}")
        if snap.name in held:
            reasons.append("held")
        if snap.name in in_use:
            reasons.append("in use by a running session")
        if oldest_cursor is not None and snap.createtxg >= oldest_cursor:
            reasons.append("another disk's cursor is not past it")
        if reasons:
            keep.append(KeptSnapshot(snap, tuple(reasons)))
        else:
            destroy.append(snap)
    return ServerPruneDecision(dataset, tuple(destroy), tuple(keep))


def other_disk_labels(config: Config, disk: Disk, source: Source) -> frozenset[str]:
    """The labels of the configured disks other than ``disk`` that back up ``source``:
    their cursors keep newer snapshots on the server."""
    return frozenset(
        other.label
        for other in config.disks
        if other.label != disk.label
        and source.name in {chosen.name for chosen in config.sources_for(other)}
    )


def cursors_of(
    bookmarks: Iterable[Bookmark], disk_label: str, prefix: str = names.DEFAULT_PREFIX
) -> tuple[Bookmark, ...]:
    """Disk ``disk_label``'s cursor bookmarks among ``bookmarks``, oldest first; the last
    is its cursor (a crash between creating a new one and destroying the old leaves two)."""
    return tuple(
        sorted(
            (b for b in bookmarks if names.is_cursor_of(b.short_name, disk_label, prefix)),
            key=lambda mark: (mark.createtxg, mark.guid),
        )
    )


def current_cursors(
    bookmarks: Iterable[Bookmark], disk_labels: Iterable[str], prefix: str = names.DEFAULT_PREFIX
) -> tuple[Bookmark, ...]:
    """The cursor (the newest of its cursor bookmarks) of each of ``disk_labels`` that has
    one among ``bookmarks``."""
    marks = tuple(bookmarks)
    found = (cursors_of(marks, label, prefix) for label in sorted(set(disk_labels)))
    return tuple(mine[-1] for mine in found if mine)


# -- snapshots the running sessions rely on (in memory, one per daemon) -------------------


@dataclass(frozen=True, slots=True)
class InUseEntry:
    """``dataset@short_name``, and with ``recursive`` the same name on every descendant
    (what ``zfs snapshot -r`` creates)."""

    dataset: str
    short_name: str
    recursive: bool = False

    def covers(self, snapshot_name: str) -> bool:
        dataset, _, short = snapshot_name.partition("@")
        if short != self.short_name:
            return False
        return dataset == self.dataset or (
            self.recursive and dataset.startswith(self.dataset + "/")
        )


@dataclass(frozen=True, slots=True)
class InUseView:
    """What other sessions' leases covered at one moment (a copy: later registrations
    and releases do not change it)."""

    entries: frozenset[InUseEntry] = frozenset()

    def covered(self, snapshot_names: Iterable[str]) -> frozenset[str]:
        """The subset of ``snapshot_names`` some entry covers."""
        return frozenset(n for n in snapshot_names if any(e.covers(n) for e in self.entries))


class InUseLease:
    """One session's registrations; ``release()`` when the session ends (idempotent)."""

    def __init__(self, registry: InUseRegistry, owner: str) -> None:
        self.owner = owner
        self._registry = registry
        self._entries: set[InUseEntry] = set()
        self._released = False

    @property
    def entries(self) -> frozenset[InUseEntry]:
        return frozenset(self._entries)

    @property
    def released(self) -> bool:
        return self._released

    def protect(self, snapshot_names: Iterable[str], *, recursive: bool = False) -> None:
        """Register full ``ds@snap`` names (``recursive``: also on every descendant)."""
        if self._released:
            raise RuntimeError(f"lease of {self.owner} used after release")
        for name in snapshot_names:
            dataset, short = names.split_snapshot_name(name)
            self._entries.add(InUseEntry(dataset, short, recursive))

    def in_use_by_others(self, snapshot_names: Iterable[str]) -> frozenset[str]:
        """Which of ``snapshot_names`` another live lease covers (this one's do not count:
        a session may prune what it no longer needs)."""
        return self.others_now().covered(snapshot_names)

    def others_now(self) -> InUseView:
        """What the other live leases cover right now, frozen."""
        return self._registry.view(excluding=self)

    def release(self) -> None:
        self._released = True
        self._entries.clear()
        self._registry.forget(self)


class InUseRegistry:
    """Server snapshots the running sessions of this daemon rely on.

    The daemon creates one and hands it to every session (a constructor argument, never a
    module global). A session registers its run snapshot before taking it and releases
    everything when it ends; pruning skips what another live lease covers. Everything
    runs on the one event loop and no method awaits, so no lock is needed.
    """

    def __init__(self) -> None:
        self._leases: list[InUseLease] = []

    def lease(self, owner: str) -> InUseLease:
        lease = InUseLease(self, owner)
        self._leases.append(lease)
        return lease

    def forget(self, lease: InUseLease) -> None:
        if lease in self._leases:
            self._leases.remove(lease)

    @property
    def live_leases(self) -> tuple[InUseLease, ...]:
        return tuple(self._leases)

    def view(self, *, excluding: InUseLease | None = None) -> InUseView:
        """What the live leases (other than ``excluding``) cover right now, frozen."""
        return InUseView(
            frozenset(e for lease in self._leases if lease is not excluding for e in lease.entries)
        )

    def in_use(
        self, snapshot_names: Iterable[str], *, excluding: InUseLease | None = None
    ) -> frozenset[str]:
        """The subset of ``snapshot_names`` some live lease (other than ``excluding``) covers."""
        return self.view(excluding=excluding).covered(snapshot_names)


# -- the shell's seam (server/cleanup.py does the asking and destroying) ---------------


class RemoteRunner(Protocol):
    """What ``cleanup.clean_up_dataset`` needs of ``remote.RemoteHost``."""

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult: ...
