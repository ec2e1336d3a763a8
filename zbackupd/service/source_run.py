"""One source's part of a run: the server snapshot, the listing, the datasets selected
and the placeholders their targets need on the disk.

The pure helpers (``select_datasets``, ``up_to``, …) decide; ``SourceRun`` asks the
server and the disk.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from zbackupd.config import Disk, Source, SourceDataset
from zbackupd.core.model import Bookmark, Encryption, Snapshot
from zbackupd.server.prune import InUseLease
from zbackupd.server.remote import RemoteHost
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.facade import Zfs


class Connector(Protocol):
    """Opens an SSH connection to a configured source (the daemon holds the client key)."""

    def __call__(self, source: Source) -> Awaitable[RemoteHost]: ...


@dataclass(frozen=True, slots=True)
class SourceDatasetInfo:
    """One server dataset selected for backup and where it lands on the disk."""

    name: str
    encryption: Encryption
    target: str
    config: SourceDataset
    volume: bool = False


@dataclass(frozen=True, slots=True)
class SourceListing:
    """What one listing of the server said: the selected datasets, parents first, and
    every snapshot and bookmark under the roots."""

    selected: tuple[SourceDatasetInfo, ...]
    snapshots: tuple[Snapshot, ...]
    bookmarks: tuple[Bookmark, ...]


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
                        row.name,
                        row.encryption,
                        target_dataset(disk, source, row.name),
                        config,
                        volume=row.volume,
                    ),
                )
    return tuple(sorted(chosen.values(), key=lambda info: info.name))


def run_snapshot_short_name(config: SourceDataset, taken_at: datetime) -> str | None:
    """The name of this run's own snapshot of a dataset (``create`` mode), else None."""
    if config.snapshots != "create":
        return None
    return names.run_snapshot_short_name(taken_at, config.snapshot_prefix)


#: The longest ``zfs snapshot`` command line sent in one piece: half of OpenSSH's 256 KiB
#: packet limit for the exec request, far below Linux's ARG_MAX (2 MiB) on the server.
SNAPSHOT_COMMAND_BYTES = 128 * 1024


def snapshot_batches(
    snapshot_names: Sequence[str], limit: int = SNAPSHOT_COMMAND_BYTES
) -> tuple[tuple[str, ...], ...]:
    """``snapshot_names`` in as few ``zfs snapshot`` commands as fit ``limit`` bytes each:
    one (atomic: one point in time) unless thousands of datasets are selected."""
    batches: list[tuple[str, ...]] = []
    batch: list[str] = []
    size = len("zfs snapshot")
    for name in snapshot_names:
        cost = len(shlex.quote(name)) + 1
        if batch and size + cost > limit:
            batches.append(tuple(batch))
            batch, size = [], len("zfs snapshot")
        batch.append(name)
        size += cost
    if batch:
        batches.append(tuple(batch))
    return tuple(batches)


def up_to(
    snapshots: Sequence[Snapshot], dataset: str, last_short_name: str | None
) -> tuple[Snapshot, ...]:
    """``dataset``'s part of a listing; with this run's own snapshot named, nothing newer.

    A run sends its own snapshot, one point in time for every dataset, even
    when a concurrent run (another disk) snapshotted again while this one was listing.
    """
    mine = [s for s in snapshots if s.dataset == dataset]
    cut = next((s.createtxg for s in mine if s.short_name == last_short_name), None)
    return tuple(mine) if cut is None else tuple(s for s in mine if s.createtxg <= cut)


class SourceRun:
    """One source over one open connection: snapshot, list, prepare the disk."""

    def __init__(
        self,
        *,
        disk: Disk,
        source: Source,
        remote: RemoteHost,
        zfs: Zfs,
        in_use: InUseLease,
        now: Callable[[], datetime],
        log: FilteringBoundLogger,
    ) -> None:
        self.disk = disk
        self.source = source
        self._remote = remote
        self._zfs = zfs
        self._in_use = in_use
        self._now = now
        self._log = log
        #: The selection of this run's dataset listing (taken once, before the snapshot).
        self._selected: tuple[SourceDatasetInfo, ...] | None = None

    @property
    def _roots(self) -> list[str]:
        return [dataset.root for dataset in self.source.datasets]

    async def select(self) -> tuple[SourceDatasetInfo, ...]:
        """The datasets under the roots that the configuration selects (listed once)."""
        if self._selected is None:
            answer = await self._remote.run(zargv.list_datasets(self._roots))
            self._selected = select_datasets(self.disk, self.source,
                                             parse.parse_datasets(answer.text))
        return self._selected

    async def take_snapshots(self) -> datetime:
        """One atomic, non-recursive ``zfs snapshot a@n b@n ...`` of exactly the selected
        datasets in ``create`` mode: an excluded descendant gets no run snapshot (nothing
        would ever prune it). Lists the datasets first (``select``).

        Returns the time the names carry. A concurrent session (two disks plugged at once)
        may have taken the same names in the same second: then that snapshot is this run's.
        """
        selected = await self.select()
        when = self._now()
        wanted = [
            names.run_snapshot_name(info.name, when, info.config.snapshot_prefix)
            for info in selected
            if info.config.snapshots == "create"
        ]
        if not wanted:
            return when
        self._in_use.protect(wanted)  # before it exists: no gap
        batches = snapshot_batches(wanted)
        if len(batches) > 1:
            self._log.warning(f"{len(wanted)} datasets: the run snapshot is taken in "
                              f"{len(batches)} commands, each atomic", datasets=len(wanted))
        for batch in batches:
            try:
                await self._remote.run(zargv.snapshot(batch))
            except parse.DatasetExists:
                self._log.info(f"server snapshot already taken: {' '.join(batch)}",
                               snapshots=list(batch))
            else:
                self._log.info(f"server snapshot taken: {' '.join(batch)}",
                               snapshots=list(batch))
        return when

    async def list(self) -> SourceListing:
        """The selected datasets (``select``) with every snapshot and bookmark under the
        roots, listed after this run's snapshot was taken."""
        selected = await self.select()
        roots = self._roots
        listing = await self._remote.run(zargv.list_snapshots_and_bookmarks(roots, recursive=True))
        snapshots, bookmarks = parse.parse_versions(listing.text)
        return SourceListing(selected, tuple(snapshots), tuple(bookmarks))

    async def ensure_parents(self, selected: Sequence[SourceDatasetInfo]) -> None:
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
                           source=self.source.name)
