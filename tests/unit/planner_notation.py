"""A compact notation for planner tests, and an in-memory disk that applies plans.

Notation of one side, tokens separated by spaces, oldest first::

    "a:1 b:2 #c:3 d:4@75"

- ``name:guid`` is a snapshot ``tank/fs@name`` with that guid;
- ``#name:guid`` is a bookmark ``tank/fs#name``;
- createtxg comes from the token's position: ``SERVER_TXG0 + 10 * position`` on the server
  and ``DISK_TXG0 + 7 * position`` on the disk — deliberately unrelated ranges, so that a
  planner comparing txgs across the two pools gets tests wrong; ``@txg`` overrides it.

A rendered plan is just as compact: steps joined by ``"; "`` — ``full a``,
``full a (exists)``, ``-I a c``, ``-i #b c``, ``resume``, ``uptodate c`` — or the
conflict's class name, e.g. ``Diverged``.

``DiskModel`` is the test's stand-in for a disk: it applies steps with the preconditions
``zfs receive`` (without ``-F``) enforces and refuses anything that would need a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zbackupd.core.conflicts import ResumeTokenInfo
from zbackupd.core.model import Bookmark, DatasetState, Snapshot
from zbackupd.core.plan import (
    DatasetPlan,
    FullSend,
    IncrementalSend,
    Resume,
    Step,
    UpToDate,
)

DATASET = "tank/fs"
SERVER_TXG0 = 100
DISK_TXG0 = 90_000


def parse_versions(
    spec: str, *, txg0: int, step: int, dataset: str = DATASET
) -> tuple[tuple[Snapshot, ...], tuple[Bookmark, ...]]:
    """Parse one side's notation into snapshots and bookmarks."""
    snapshots: list[Snapshot] = []
    bookmarks: list[Bookmark] = []
    for position, token in enumerate(spec.split(), start=1):
        body, _, explicit_txg = token.partition("@")
        name, _, guid_text = body.partition(":")
        if not guid_text:
            raise ValueError(f"token {token!r} needs name:guid")
        txg = int(explicit_txg) if explicit_txg else txg0 + step * position
        if name.startswith("#"):
            bookmarks.append(Bookmark(f"{dataset}#{name[1:]}", int(guid_text), txg))
        else:
            snapshots.append(Snapshot(f"{dataset}@{name}", int(guid_text), txg))
    return tuple(snapshots), tuple(bookmarks)


def server(spec: str, dataset: str = DATASET) -> DatasetState:
    snapshots, bookmarks = parse_versions(spec, txg0=SERVER_TXG0, step=10, dataset=dataset)
    return DatasetState(dataset, snapshots, bookmarks)


def disk(
    spec: str | None, *, token: str | None = None, written: int = 0, dataset: str = DATASET
) -> DatasetState | None:
    """``None`` means the dataset does not exist on the disk; ``""`` means no snapshots."""
    if spec is None:
        return None
    snapshots, bookmarks = parse_versions(spec, txg0=DISK_TXG0, step=7, dataset=dataset)
    if bookmarks:
        raise ValueError("the disk side holds no bookmarks in this notation")
    return DatasetState(dataset, snapshots, (), token, written)


def cursor(spec: str, dataset: str = DATASET) -> Bookmark:
    """One bookmark token, e.g. ``"#zb_disk1:2"``."""
    _, bookmarks = parse_versions(spec, txg0=SERVER_TXG0, step=10, dataset=dataset)
    (mark,) = bookmarks
    return mark


def _short(item: Snapshot | Bookmark) -> str:
    return f"#{item.short_name}" if isinstance(item, Bookmark) else item.short_name


def render_step(step: Step) -> str:
    match step:
        case Resume():
            return "resume"
        case FullSend(snapshot=snap, target_exists=exists):
            return f"full {snap.short_name}" + (" (exists)" if exists else "")
        case IncrementalSend(from_=base, to=to, intermediates=intermediates):
            return f"{'-I' if intermediates else '-i'} {_short(base)} {to.short_name}"
        case UpToDate(snapshot=snap):
            return f"uptodate {snap.short_name}"


def render(plan: DatasetPlan) -> str:
    if plan.conflict is not None:
        return type(plan.conflict).__name__
    return "; ".join(render_step(step) for step in plan.steps)


class SimulatedReceiveError(AssertionError):
    """A step that real ``zfs send``/``zfs receive`` (without ``-F``) would refuse."""


@dataclass
class DiskModel:
    """Mutable, test-only model of one dataset on the disk.

    ``resume_target`` is the server snapshot a partial receive (``token``) would finish.
    """

    exists: bool
    snapshots: list[Snapshot] = field(default_factory=list)
    token: str | None = None
    resume_target: Snapshot | None = None
    resume_from_guid: int | None = None
    written: int = 0
    next_txg: int = DISK_TXG0

    def state(self, dataset: str = DATASET) -> DatasetState | None:
        if not self.exists:
            return None
        return DatasetState(dataset, tuple(self.snapshots), (), self.token, self.written)

    def token_info(self) -> ResumeTokenInfo | None:
        """What decoding the token would tell (``zfs send -nvt`` prints the same)."""
        if self.token is None or self.resume_target is None:
            return None
        return ResumeTokenInfo(
            self.resume_target.guid, self.resume_from_guid, self.resume_target.name
        )

    def guids(self) -> list[int]:
        return [snap.guid for snap in self.snapshots]

    def _receive(self, snap: Snapshot) -> None:
        if snap.guid in self.guids():
            raise SimulatedReceiveError(f"disk already has guid {snap.guid}")
        self.next_txg += 3
        self.snapshots.append(Snapshot(snap.name, snap.guid, self.next_txg, snap.creation))
        self.exists = True

    def apply(self, step: Step, server_state: DatasetState) -> None:
        on_server = {s.name: s for s in server_state.snapshots}
        marks = {b.name: b for b in server_state.bookmarks}
        if self.token is not None and not isinstance(step, Resume):
            raise SimulatedReceiveError("a partial receive blocks every other receive")
        match step:
            case UpToDate():
                return
            case Resume(token=token):
                if token != self.token or self.resume_target is None:
                    raise SimulatedReceiveError("no such partial receive")
                if self.resume_target.name not in on_server:
                    raise SimulatedReceiveError("send -t: the snapshot is gone on the server")
                sources = {s.guid for s in on_server.values()} | {b.guid for b in marks.values()}
                if self.resume_from_guid is not None and self.resume_from_guid not in sources:
                    raise SimulatedReceiveError("send -t: the source is gone on the server")
                self._receive(self.resume_target)
                self.token, self.resume_target = None, None
            case FullSend(snapshot=snap, target_exists=exists):
                if self.snapshots:
                    raise SimulatedReceiveError("full receive onto a dataset with snapshots")
                if self.exists and not exists:
                    raise SimulatedReceiveError("full receive into an existing dataset")
                if on_server.get(snap.name) != snap:
                    raise SimulatedReceiveError(f"{snap.name} not on the server")
                self._receive(snap)
                self.written = 0  # a full receive replaces the dataset's contents
            case IncrementalSend(from_=base, to=to, intermediates=intermediates):
                self._apply_incremental(base, to, intermediates, on_server, marks)

    def _apply_incremental(
        self,
        base: Snapshot | Bookmark,
        to: Snapshot,
        intermediates: bool,
        on_server: dict[str, Snapshot],
        marks: dict[str, Bookmark],
    ) -> None:
        if (on_server.get(base.name) or marks.get(base.name)) != base:
            raise SimulatedReceiveError(f"source {base.name} not on the server")
        if on_server.get(to.name) != to or to.createtxg <= base.createtxg:
            raise SimulatedReceiveError(f"target {to.name} not newer on the server")
        if not self.snapshots or self.snapshots[-1].guid != base.guid:
            raise SimulatedReceiveError("most recent disk snapshot does not match the source")
        if self.written:
            raise SimulatedReceiveError("destination has been modified")
        if intermediates and isinstance(base, Bookmark):
            raise SimulatedReceiveError("-I from a bookmark")
        if intermediates:
            between = sorted(
                (s for s in on_server.values() if base.createtxg < s.createtxg <= to.createtxg),
                key=lambda s: s.createtxg,
            )
            for snap in between:
                self._receive(snap)
        else:
            self._receive(to)
