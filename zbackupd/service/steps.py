"""Pure decisions of one dataset's replication (``replicate.py`` carries them out).

The server-side argv of a planned step, which server snapshot it holds and where the
disk's cursor then points; the planner's snapshot filter and the disk's retention policy
from the config; whether the disk's resume token can still work, and the sentence that
says why a partial receive was aborted; the typed error of a step that does not fit on
the disk even after pruning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from zbackupd.config import Config, Disk, SourceDataset
from zbackupd.core import plan as planner
from zbackupd.core.conflicts import ResumeTokenInfo, ResumeTokenMismatch
from zbackupd.core.model import Encryption, Snapshot
from zbackupd.core.retention import RetentionPolicy
from zbackupd.core.status import human_bytes
from zbackupd.errors import PermanentError, ZbackupdError
from zbackupd.server.transfer import TransferFailed
from zbackupd.zfs import argv as zargv
from zbackupd.zfs.names import InvalidName
from zbackupd.zfs.parse import GateRefused, ResumeTokenInvalid, ZfsCommandError


def snapshot_filter(config: SourceDataset) -> planner.SnapshotFilter:
    if config.snapshots == "reuse" and config.reuse_pattern is not None:
        return planner.SnapshotFilter(reuse_patterns=(config.reuse_pattern,))
    return planner.SnapshotFilter(own_prefix=config.snapshot_prefix + "_")


def retention_policy(config: Config, disk: Disk) -> RetentionPolicy:
    kept = config.retention_for(disk)
    return RetentionPolicy(
        keep_last=kept.keep_last,
        hourly=kept.hourly,
        daily=kept.daily,
        weekly=kept.weekly,
        monthly=kept.monthly,
        yearly=kept.yearly,
    )


def send_argv(
    step: planner.TransferStep, mode: Encryption, *, estimate: bool = False
) -> tuple[str, ...]:
    """The server-side ``zfs send`` for one planned step (``-w`` or ``-L -c`` by ``mode``)."""
    if isinstance(step, planner.Resume):
        return zargv.send_resume(step.token, estimate=estimate)
    if isinstance(step, planner.FullSend):
        return zargv.send_full(step.snapshot.name, mode, estimate=estimate)
    return zargv.send_incremental(
        step.from_.name, step.to.name, mode, intermediates=step.intermediates, estimate=estimate
    )


def held_snapshot_name(step: planner.TransferStep) -> str | None:
    """The server snapshot a step sends up to: held on the server while it travels and,
    if the stream is interrupted, until the resume lands (``zfs send -t`` needs it)."""
    if isinstance(step, planner.FullSend):
        return step.snapshot.name
    if isinstance(step, planner.IncrementalSend):
        return step.to.name
    try:
        return zargv.decode_resume_token(step.token).toname
    except zargv.InvalidArgument:
        return None  # the resume itself reports the bad token


def step_target(
    step: planner.TransferStep, server_snapshots: Sequence[Snapshot]
) -> Snapshot | None:
    """The server snapshot the disk holds once ``step`` has landed (where this disk's
    cursor then points), None when the listing does not have it."""
    if isinstance(step, planner.FullSend):
        return step.snapshot
    if isinstance(step, planner.IncrementalSend):
        return step.to
    try:
        guid = zargv.decode_resume_token(step.token).toguid
    except zargv.InvalidArgument:
        return None
    return next((snap for snap in server_snapshots if snap.guid == guid), None)


# -- resume tokens ------------------------------------------------------------------------


def read_resume_token(token: str) -> ResumeTokenInfo | str:
    """What the disk's ``receive_resume_token`` continues (for the planner's check), or
    why it cannot be read (then the partial receive can only be aborted)."""
    try:
        contents = zargv.decode_resume_token(token)
    except (zargv.InvalidArgument, InvalidName) as error:
        return f"its resume token cannot be read ({error.reason})"
    return ResumeTokenInfo(contents.toguid, contents.fromguid, contents.toname)


def mismatch_reason(mismatch: ResumeTokenMismatch) -> str:
    """Why the planner refused the resume, as the abort's warning says it."""
    token = mismatch.token
    if mismatch.missing_role == "target":
        name = token.to_name or "its snapshot"
        return f"its snapshot {name} (guid {mismatch.missing_guid}) is gone from the server"
    return (
        f"its incremental source (guid {mismatch.missing_guid}) is gone from the server "
        "(neither a snapshot nor a bookmark there)"
        + (f"; it was receiving {token.to_name}" if token.to_name else "")
    )


def abort_message(target: str, reason: str) -> str:
    """The warning for an aborted partial receive: self-contained, dataset and why."""
    return (
        f"partial receive of {target} aborted: {reason}; its partial data is discarded "
        "(zfs receive -A) and the dataset is planned afresh"
    )


def resume_base_guids(token: str | None) -> frozenset[int]:
    """The disk snapshot a partial incremental receive builds on: pruning must keep it."""
    if token is None:
        return frozenset()
    read = read_resume_token(token)
    if isinstance(read, str) or read.from_guid is None:
        return frozenset()
    return frozenset({read.from_guid})


def causes_of(error: ZbackupdError) -> tuple[ZbackupdError, ...]:
    """The typed errors behind a failed step: a transfer's failing side first, then the
    other side's (a full disk may surface as the sender's broken pipe first), else the
    error itself."""
    if isinstance(error, TransferFailed):
        return (error.cause,) if error.other is None else (error.cause, error.other)
    return (error,)


#: What the server's gate says when a token's GUIDs do not fit the server (server/gate.py
#: ``_toguid_refusal``, ``_fromguid_refusal``): the resume cannot work there.
_GATE_TOKEN_REFUSALS = (
    "resume token's snapshot",
    "resume token's toguid",
    "resume token's incremental source",
)


def refused_resume(causes: Sequence[ZbackupdError]) -> ZfsCommandError | None:
    """The error saying the server cannot resume this token (zfs's own, or the gate's
    check of its GUIDs), if that is why the step failed."""
    for cause in causes:
        if isinstance(cause, ResumeTokenInvalid):
            return cause
        if isinstance(cause, GateRefused) and any(
            needle in cause.stderr for needle in _GATE_TOKEN_REFUSALS
        ):
            return cause
    return None


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# -- a disk too full ------------------------------------------------------------------------


class ReceiveDoesNotFit(PermanentError):
    """A step ran out of space on the disk, even after pruning it per policy (or with
    nothing the policy lets go). Nothing else was destroyed: a human makes room."""

    def __init__(
        self,
        target: str,
        pool: str,
        *,
        needed: int | None,
        available: int | None,
        pruned: Iterable[str],
    ) -> None:
        self.target = target
        self.pool = pool
        self.needed = needed
        self.available = available
        self.pruned = tuple(pruned)
        need = "an unknown number of bytes (no size estimate)" if needed is None else (
            f"about {needed} bytes ({human_bytes(needed)})"
        )
        free = "an unknown number of bytes" if available is None else (
            f"{available} bytes ({human_bytes(available)})"
        )
        if self.pruned:
            done = (f"after pruning {len(self.pruned)} snapshot(s) of it per the retention "
                    "policy and retrying once")
        else:
            done = "and the retention policy lets no snapshot of it go"
        super().__init__(
            f"{target}: out of space on pool {pool} {done}: the stream needs {need}, the "
            f"pool has {free} available. Nothing else was destroyed; make room on the disk "
            "(fewer kept snapshots, other data) or use a larger one."
        )
