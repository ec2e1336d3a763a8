"""``zbackupd plan``: what the next plug-in of a disk would send, without the disk.

The disk's last known state is on the server: its cursor bookmark marks the snapshot it
last received. So the preview needs only the server listing: per selected dataset, a
full send (no cursor of this disk), an increment from the cursor to the newest snapshot
to send (with ``zfs send -nvP`` for its size), or nothing. In ``create`` mode the run
adds a new snapshot where something was written since the newest one; the bytes written
are shown. Nothing is snapshotted, held or sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from zbackupd.config import Config, Disk, Source
from zbackupd.core.model import Bookmark, DatasetState, Encryption, Snapshot, group_versions
from zbackupd.core.plan import select_sendable
from zbackupd.errors import ZbackupdError
from zbackupd.server.prune import cursors_of
from zbackupd.server.remote import RemoteHost
from zbackupd.service.source_run import select_datasets
from zbackupd.service.steps import snapshot_filter
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import parse


@dataclass(frozen=True, slots=True)
class DatasetPreview:
    dataset: str
    #: "full", "incremental", "new snapshot" (only what the run snapshots) or "up to date"
    action: str
    #: the cursor the increment starts from (None for a full send)
    base: str | None
    #: the newest existing snapshot to send (None: only a new run snapshot, or nothing)
    target: str | None
    #: bytes written since the newest snapshot (a new run snapshot carries them)
    written: int | None
    estimated_bytes: int | None = None

    def describe(self) -> str:
        sizes = []
        if self.estimated_bytes is not None:
            sizes.append(f"~{self.estimated_bytes} bytes")
        if self.written:
            sizes.append(f"+{self.written} bytes written since (a new run snapshot)")
        size = f" ({', '.join(sizes)})" if sizes else ""
        if self.action == "full":
            return f"{self.dataset}: full send of {self.target or 'a new run snapshot'}{size}"
        if self.action == "incremental":
            return f"{self.dataset}: incremental from {self.base} to {self.target}{size}"
        if self.action == "new snapshot":
            return f"{self.dataset}: incremental from {self.base} to a new run snapshot{size}"
        return f"{self.dataset}: up to date at {self.base}"


def preview_dataset(
    state: DatasetState,
    cursors: Sequence[Bookmark],
    sendable: Sequence[Snapshot],
    *,
    creates_snapshots: bool,
    written: int | None,
) -> DatasetPreview:
    """Pure: what the next run sends of one dataset, from the server's side alone."""
    newest = sendable[-1] if sendable else None
    pending = written if creates_snapshots and (written or newest is None) else None
    cursor = cursors[-1] if cursors else None
    if cursor is None:
        return DatasetPreview(state.name, "full", None, newest.name if newest else None,
                              pending)
    if newest is not None and newest.guid != cursor.guid and newest.createtxg > cursor.createtxg:
        return DatasetPreview(state.name, "incremental", cursor.name, newest.name, pending)
    if pending:
        return DatasetPreview(state.name, "new snapshot", cursor.name, None, pending)
    return DatasetPreview(state.name, "up to date", cursor.name, None, None)


Connect = Callable[[Source], Awaitable[RemoteHost]]


async def preview_disk(config: Config, disk: Disk, connect: Connect) -> list[dict[str, Any]]:
    """Per source of ``disk``: its datasets' previews, or why the source could not be
    asked (one source's failure does not hide the others')."""
    sources: list[dict[str, Any]] = []
    for source in config.sources_for(disk):
        try:
            datasets = await _preview_source(disk, source, connect)
        except ZbackupdError as error:
            sources.append({"source": source.name, "error": str(error), "datasets": []})
            continue
        sources.append({"source": source.name, "error": None,
                        "datasets": [{**asdict(d), "summary": d.describe()} for d in datasets]})
    return sources


async def _preview_source(disk: Disk, source: Source, connect: Connect) -> list[DatasetPreview]:
    remote = await connect(source)
    async with remote:
        roots = [dataset.root for dataset in source.datasets]
        rows = parse.parse_datasets((await remote.run(zargv.list_datasets(roots))).text)
        listing = await remote.run(zargv.list_snapshots_and_bookmarks(roots, recursive=True))
        states = group_versions(*parse.parse_versions(listing.text))
        written = {row.name: row.written for row in rows}
        previews = []
        for info in select_datasets(disk, source, rows):
            state = states.get(info.name, DatasetState(info.name, ()))
            sendable = select_sendable(state.snapshots, snapshot_filter(info.config))
            preview = preview_dataset(
                state, cursors_of(state.bookmarks, disk.label, info.config.snapshot_prefix),
                sendable,
                creates_snapshots=info.config.snapshots == "create",
                written=written.get(info.name),
            )
            if preview.action in ("full", "incremental") and preview.target is not None:
                preview = await _with_estimate(remote, preview, info.encryption)
            previews.append(preview)
        return previews


async def _with_estimate(
    remote: RemoteHost, preview: DatasetPreview, mode: Encryption
) -> DatasetPreview:
    """``zfs send -nvP`` of the step (a dry run on the server); unknown if it fails."""
    assert preview.target is not None  # noqa: S101 -- checked by the caller
    argv = (zargv.send_full(preview.target, mode, estimate=True) if preview.base is None
            else zargv.send_incremental(preview.base, preview.target, mode, estimate=True))
    try:
        result = await remote.run(argv)
        size = parse.parse_send_estimate(result.text + "\n" + result.stderr)
    except (ZbackupdError, parse.ParseError):
        return preview
    return DatasetPreview(preview.dataset, preview.action, preview.base, preview.target,
                          preview.written, size)
