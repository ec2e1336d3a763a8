"""Why a dataset cannot be planned without a human: the planner's typed conflicts.

Each conflict is a frozen record of the facts that explain it (``explain()`` is the
sentence for the log and ``zbackupd plan``) and says with ``transient`` whether a later run
can get past it on its own. ``plan.py`` decides which one applies; nothing here decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zbackupd.core.model import Bookmark, Encryption, Snapshot


@dataclass(frozen=True, slots=True)
class ResumeTokenInfo:
    """What a ``receive_resume_token`` refers to (as ``zfs send -nvt <token>`` prints it).

    Optional input of the planner: when given, it checks the token still fits the server,
    and a :class:`ResumeTokenMismatch` carries it when it does not.
    """

    to_guid: int
    from_guid: int | None = None  # None: the partial receive is a full stream
    to_name: str = ""


def _name_or_none(item: Snapshot | Bookmark | None) -> str:
    return "none" if item is None else f"{item.name} (guid {item.guid})"


@dataclass(frozen=True, slots=True)
class NoCommonSnapshot:
    """The disk has snapshots, none of which shares a guid with the server's."""

    transient: ClassVar[bool] = False
    dataset: str
    server_newest: Snapshot | None
    server_newest_bookmark: Bookmark | None
    disk_newest: Snapshot
    cursor: Bookmark | None = None

    def explain(self) -> str:
        text = (
            f"{self.dataset}: no common snapshot between server and disk; server newest "
            f"{_name_or_none(self.server_newest)}, newest bookmark "
            f"{_name_or_none(self.server_newest_bookmark)}, disk newest "
            f"{_name_or_none(self.disk_newest)}"
        )
        if self.cursor is not None:
            text += (
                f"; this disk's cursor {self.cursor.name} (guid {self.cursor.guid}) "
                "matches no snapshot on the disk"
            )
        return text + ". A full resend (into a new dataset, or after destroying the disk's copy)."


@dataclass(frozen=True, slots=True)
class Diverged:
    """The disk has snapshots newer than the common base that the server does not have."""

    transient: ClassVar[bool] = False
    dataset: str
    common_base: Snapshot  # the disk-side snapshot
    disk_only: tuple[Snapshot, ...]
    server_only: tuple[Snapshot, ...]

    def explain(self) -> str:
        disk_only = ", ".join(snap.short_name for snap in self.disk_only)
        return (
            f"{self.dataset}: diverged after common snapshot {self.common_base.name} "
            f"(guid {self.common_base.guid}): the disk has {len(self.disk_only)} newer "
            f"snapshot(s) the server does not ({disk_only}) — destroyed on the server, or "
            f"taken on the disk; the server has {len(self.server_only)} newer one(s). "
            "Receiving would need a rollback that destroys the disk's newer snapshots."
        )


@dataclass(frozen=True, slots=True)
class TargetModified:
    """The disk's dataset was written to since its newest snapshot: a receive would fail."""

    transient: ClassVar[bool] = False
    dataset: str
    last_snapshot: Snapshot
    written_bytes: int

    def explain(self) -> str:
        return (
            f"{self.dataset}: modified on the disk since {self.last_snapshot.name} "
            f"({self.written_bytes} bytes written); an incremental receive needs a rollback "
            "to that snapshot, which zbackupd does only by explicit policy."
        )


@dataclass(frozen=True, slots=True)
class ResumeTokenMismatch:
    """The disk's partial receive refers to a snapshot or base the server no longer has."""

    transient: ClassVar[bool] = False
    dataset: str
    token: ResumeTokenInfo
    missing_guid: int
    missing_role: str  # "target" or "source"

    def explain(self) -> str:
        name = f" {self.token.to_name}" if self.token.to_name else ""
        return (
            f"{self.dataset}: the interrupted receive{name} cannot be resumed: its "
            f"{self.missing_role} (guid {self.missing_guid}) is gone from the server. "
            "Discard the partial state with `zfs receive -A` and re-plan."
        )


@dataclass(frozen=True, slots=True)
class NoSourceSnapshot:
    """The server has no selectable snapshot of this dataset to send yet."""

    transient: ClassVar[bool] = True
    dataset: str
    server_snapshot_count: int

    def explain(self) -> str:
        return (
            f"{self.dataset}: nothing to send — the server has {self.server_snapshot_count} "
            "snapshot(s), none selected by the snapshot filter."
        )


@dataclass(frozen=True, slots=True)
class EncryptionModeMismatch:
    """The disk's copy was received in the other mode (raw vs. under the pool's key).

    Raw and non-raw streams never mix in one target (later incrementals fail with an
    IV-set-guid mismatch), so the source's encryption must have changed.
    """

    transient: ClassVar[bool] = False
    dataset: str
    source: Encryption
    disk: Encryption

    def explain(self) -> str:
        return (
            f"{self.dataset}: the source is {self.source.value} but the disk's copy was "
            f"received as {self.disk.value}; raw and non-raw streams cannot be mixed in one "
            "dataset. Receive into a new dataset (full send) or remove the disk's copy."
        )


Conflict = (
    NoCommonSnapshot
    | Diverged
    | TargetModified
    | ResumeTokenMismatch
    | NoSourceSnapshot
    | EncryptionModeMismatch
)
