"""One source's part of a run: the server snapshot, the listing, the datasets selected
and the placeholders their targets need on the disk.

The pure helpers (``select_datasets``, ``up_to``, …) decide; ``SourceRun`` asks the
server and the disk.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from zbackupd.config import Disk, Source, SourceDataset
from zbackupd.core import idle
from zbackupd.core.model import DatasetState, Encryption, Snapshot, group_versions
from zbackupd.core.plan import SnapshotFilter
from zbackupd.server.prune import InUseLease
from zbackupd.server.remote import RemoteHost
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import names, parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.listing import RefusedRow, parse_datasets_by_row, parse_versions_by_dataset


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
    #: Bytes written since the dataset's newest snapshot, as the listing said (None:
    #: unknown).
    written: int | None = None
    #: The short name of the snapshot this run took of it (None: it took none).
    run_snapshot: str | None = None


@dataclass(frozen=True, slots=True)
class SourceListing:
    """What the listings of the server said: the selected datasets, parents first, and
    each dataset's snapshots and bookmarks under the roots (grouped once per source)."""

    selected: tuple[SourceDatasetInfo, ...]
    versions: Mapping[str, DatasetState]
    #: Datasets left out because a row of theirs has a name the grammar refuses: each is
    #: its own problem, the others run (``zfs.listing``).
    refused: tuple[RefusedRow, ...] = ()

    def state(self, dataset: str) -> DatasetState:
        """``dataset``'s snapshots and bookmarks (none listed: an empty state)."""
        return self.versions.get(dataset) or DatasetState(dataset, ())


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
                        written=row.written,
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


def run_snapshot_targets(config: SourceDataset) -> SnapshotFilter:
    """What the planner may send of a ``create``-mode dataset: its own run snapshots
    (``replicate.snapshot_filter`` for that mode)."""
    return SnapshotFilter(own_prefix=config.snapshot_prefix + "_")


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
        #: Snapshots and bookmarks per dataset when listed before the snapshot (some
        #: dataset had nothing written), else None.
        self._versions: dict[str, DatasetState] | None = None
        #: The datasets snapshotted by this run, with the snapshot's short name.
        self._taken: dict[str, str] = {}
        #: Rows of the listings the name grammar refused (their datasets are left out).
        self._refused: dict[str, RefusedRow] = {}

    @property
    def _roots(self) -> list[str]:
        return [dataset.root for dataset in self.source.datasets]

    async def select(self) -> tuple[SourceDatasetInfo, ...]:
        """The datasets under the roots that the configuration selects (listed once)."""
        if self._selected is None:
            answer = await self._remote.run(zargv.list_datasets(self._roots))
            rows, refused = parse_datasets_by_row(answer.text)
            self._refuse(refused)
            self._selected = select_datasets(self.disk, self.source, rows)
        return self._selected

    async def take_snapshots(self) -> datetime:
        """One atomic, non-recursive ``zfs snapshot a@n b@n ...`` of the selected datasets
        in ``create`` mode that need one: an excluded descendant gets no run snapshot
        (nothing would ever prune it), and neither does a dataset with nothing written
        since a newest snapshot that is already a send target (``idle.needs_run_snapshot``:
        the run sends that one where it is missing). Lists the datasets first
        (``select``), and their snapshots too when some had nothing written.

        Returns the time the names carry. A concurrent session (two disks plugged at once)
        may have taken the same names in the same second: then that snapshot is this run's.
        """
        selected = await self.select()
        when = self._now()
        create = [info for info in selected if info.config.snapshots == "create"]
        spared: set[str] = set()
        if any(info.written == 0 for info in create):
            self._versions = await self._list_versions(recursive=True, datasets=self._roots)
            for info in create:
                state = self._versions.get(info.name)
                if not idle.needs_run_snapshot(state, info.written,
                                               run_snapshot_targets(info.config)):
                    spared.add(info.name)
                    newest = idle.newest_snapshot(state)
                    if newest is not None:
                        self._in_use.protect([newest.name])  # what this run sends instead
            # A dataset the listing refused is left out: it gets no run snapshot either.
            create = [info for info in create if info.name not in self._refused]
        if spared:
            self._log.info(f"{len(spared)} dataset(s) unchanged since their newest snapshot: "
                           "no run snapshot", datasets=len(spared), source=self.source.name)
        wanted = {
            info.name: names.run_snapshot_short_name(when, info.config.snapshot_prefix)
            for info in create
            if info.name not in spared
        }
        if not wanted:
            return when
        full = [f"{dataset}@{short}" for dataset, short in wanted.items()]
        self._in_use.protect(full)  # before it exists: no gap
        batches = snapshot_batches(full)
        if len(batches) > 1:
            self._log.warning(f"{len(full)} datasets: the run snapshot is taken in "
                              f"{len(batches)} commands, each atomic", datasets=len(full))
        for batch in batches:
            try:
                await self._remote.run(zargv.snapshot(batch))
            except parse.DatasetExists:
                self._log.info(f"server snapshot already taken: {' '.join(batch)}",
                               snapshots=list(batch))
            else:
                self._log.info(f"server snapshot taken: {' '.join(batch)}",
                               snapshots=list(batch))
        self._taken = wanted
        return when

    async def _list_versions(
        self, *, recursive: bool, datasets: Sequence[str]
    ) -> dict[str, DatasetState]:
        """Snapshots and bookmarks of ``datasets`` (``-r``: and everything under them),
        grouped by dataset; ``-d 1`` listings go in commands of bounded length."""
        batches = (tuple(datasets),) if recursive else snapshot_batches(datasets)
        grouped: dict[str, DatasetState] = {}
        for batch in batches:
            answer = await self._remote.run(
                zargv.list_snapshots_and_bookmarks(batch, recursive=recursive))
            listing = parse_versions_by_dataset(answer.text)
            self._refuse(listing.refused)
            grouped.update(group_versions(listing.snapshots, listing.bookmarks))
        return grouped

    def _refuse(self, rows: Sequence[RefusedRow]) -> None:
        for row in rows:
            self._refused.setdefault(row.dataset, row)

    async def list(self) -> SourceListing:
        """The selected datasets (``select``) with their snapshots and bookmarks as they
        are after this run's snapshot: one recursive listing, or, when the datasets were
        listed before the snapshot, a ``-d 1`` listing of just the snapshotted ones."""
        selected = await self.select()
        if self._versions is None:
            versions = await self._list_versions(recursive=True, datasets=self._roots)
        else:
            versions = dict(self._versions)
            if self._taken:
                versions.update(await self._list_versions(recursive=False,
                                                          datasets=list(self._taken)))
        chosen = tuple(
            replace(info, run_snapshot=self._taken[info.name]) if info.name in self._taken
            else info
            for info in selected
            if info.name not in self._refused
        )
        return SourceListing(chosen, versions, tuple(self._refused.values()))

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
