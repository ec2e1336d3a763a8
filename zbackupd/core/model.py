"""Plain, frozen data the pure core decides on. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Explicit re-export (mypy --strict): Encryption lives where the gate can import it cheaply.
from zbackupd.core.values import Encryption as Encryption  # noqa: PLC0414 -- re-export


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot as ZFS reports it. ``name`` is the full ``pool/fs@snap`` name.

    Identity is the ``guid``; order is ``createtxg``. Names are only for humans.
    """

    name: str
    guid: int
    createtxg: int
    creation: int = 0  # seconds since the epoch, for retention

    @property
    def dataset(self) -> str:
        return self.name.partition("@")[0]

    @property
    def short_name(self) -> str:
        return self.name.partition("@")[2]


@dataclass(frozen=True, slots=True)
class Bookmark:
    """A bookmark (``pool/fs#mark``): a space-free incremental source on the server."""

    name: str
    guid: int
    createtxg: int
    creation: int = 0

    @property
    def dataset(self) -> str:
        return self.name.partition("#")[0]

    @property
    def short_name(self) -> str:
        return self.name.partition("#")[2]


@dataclass(frozen=True, slots=True)
class Hold:
    """A user hold on a snapshot (``zfs holds -H -p``)."""

    snapshot: str
    tag: str
    timestamp: int


@dataclass(frozen=True, slots=True)
class DatasetState:
    """What the planner needs to know about one dataset on one side."""

    name: str
    snapshots: tuple[Snapshot, ...]
    bookmarks: tuple[Bookmark, ...] = ()
    receive_resume_token: str | None = None
    written_since_last_snapshot: int = 0


def group_versions(
    snapshots: Iterable[Snapshot], bookmarks: Iterable[Bookmark] = ()
) -> dict[str, DatasetState]:
    """One listing of many datasets → each dataset's state, in one pass (a run plans
    thousands of datasets: filtering the whole listing per dataset is quadratic). The
    listing's order is kept within each dataset; a dataset with only bookmarks appears."""
    snaps: dict[str, list[Snapshot]] = {}
    marks: dict[str, list[Bookmark]] = {}
    for snapshot in snapshots:
        snaps.setdefault(snapshot.name.partition("@")[0], []).append(snapshot)
    for bookmark in bookmarks:
        marks.setdefault(bookmark.name.partition("#")[0], []).append(bookmark)
    return {
        name: DatasetState(name, tuple(snaps.get(name, ())), tuple(marks.get(name, ())))
        for name in {**snaps, **marks}
    }


@dataclass(frozen=True, slots=True)
class DiskIdentity:
    """Who a disk claims to be: the serial selects it, the pool GUID proves it."""

    serial: str
    pool_guid: int
    pool_name: str
    label: str
