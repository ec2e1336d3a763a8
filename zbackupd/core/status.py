"""What the daemon is doing, as data, and the one line systemd shows for it.

Pure: the daemon updates a ``DaemonStatus`` as it goes; ``status_line`` renders it for
``systemctl status`` (``STATUS=``) and ``as_dict`` for ``zbackupd status --json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any


class Phase(Enum):
    """Where one disk's session is. The order is the order of a successful run."""

    DETECTED = "detected"
    WAITING_FOR_UNLOCK = "waiting for unlock"
    IMPORTING = "importing"
    UNLOCKING = "unlocking"
    CONNECTING = "connecting"
    PLANNING = "planning"
    TRANSFERRING = "transferring"
    PRUNING = "pruning"
    RETRYING = "waiting to retry"  # a source failed transiently: tried again after a wait
    EXPORTING = "exporting"
    POWERING_OFF = "powering off"
    DONE = "done"
    SUSPENDED = "suspended"  # pulled mid-write: re-plug to finish
    REFUSED = "refused"  # impostor, wrong key: nothing was touched
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Progress:
    dataset: str
    bytes_done: int
    bytes_total: int | None
    rate: float  # bytes per second
    datasets_done: int = 0
    datasets_total: int = 0

    @property
    def eta_seconds(self) -> float | None:
        if self.bytes_total is None or self.rate <= 0:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / self.rate)


@dataclass(frozen=True, slots=True)
class DiskStatus:
    label: str
    serial: str
    phase: Phase
    run_id: str | None = None
    progress: Progress | None = None
    message: str = ""  # what happened / what the admin must do
    last_result: str | None = None  # "ok" / "failed: …" of the last finished run
    last_success: float | None = None  # epoch seconds


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    locked: bool = True
    disks: tuple[DiskStatus, ...] = field(default_factory=tuple)
    notice: str = ""  # e.g. a refused unlock: shown while it matters (locked)
    #: disks with no success for too long: ``offsite-b: no backup for 20 days``
    stale: tuple[str, ...] = ()

    def with_disk(self, disk: DiskStatus) -> DaemonStatus:
        others = tuple(d for d in self.disks if d.label != disk.label)
        return replace(self, disks=tuple(sorted((*others, disk), key=lambda d: d.label)))


def keep_history(previous: DiskStatus | None, new: DiskStatus) -> DiskStatus:
    """``new`` with the last result and last success it does not know taken from
    ``previous``: a running or failed session knows neither, and a failure never erases
    when the disk last succeeded."""
    if previous is None:
        return new
    return replace(
        new,
        last_result=new.last_result if new.last_result is not None else previous.last_result,
        last_success=new.last_success if new.last_success is not None
        else previous.last_success,
    )


_ACTIVE = frozenset(
    {Phase.DETECTED, Phase.IMPORTING, Phase.UNLOCKING, Phase.CONNECTING, Phase.PLANNING,
     Phase.TRANSFERRING, Phase.PRUNING, Phase.RETRYING, Phase.EXPORTING, Phase.POWERING_OFF}
)


_KIB = 1024
_PROBLEMS = frozenset({Phase.SUSPENDED, Phase.REFUSED, Phase.FAILED})


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < _KIB or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= _KIB
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:  # noqa: PLR2004 -- one minute
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:  # noqa: PLR2004 -- one hour
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe_disk(disk: DiskStatus) -> str:
    """``offsite-a: transferring tank/home 1.2 GiB/3.4 GiB at 80.0 MiB/s, ETA 28s``."""
    if disk.phase is Phase.TRANSFERRING and disk.progress is not None:
        p = disk.progress
        done = human_bytes(p.bytes_done)
        total = f"/{human_bytes(p.bytes_total)}" if p.bytes_total is not None else ""
        eta = f", ETA {human_duration(p.eta_seconds)}" if p.eta_seconds is not None else ""
        count = f" ({p.datasets_done + 1}/{p.datasets_total})" if p.datasets_total else ""
        return (f"{disk.label}: {p.dataset}{count} {done}{total} "
                f"at {human_bytes(p.rate)}/s{eta}")
    if disk.phase is Phase.RETRYING and disk.message:
        return f"{disk.label}: {disk.message}"  # "retrying server nas in 40 s, attempt 3/8: …"
    text = f"{disk.label}: {disk.phase.value}"
    return f"{text} — {disk.message}" if disk.message else text


def status_line(status: DaemonStatus) -> str:
    """One line: what matters most first (active sessions, then problems, then idle)."""
    active = [d for d in status.disks if d.phase in _ACTIVE]
    waiting = [d for d in status.disks if d.phase is Phase.WAITING_FOR_UNLOCK]
    problems = [d for d in status.disks if d.phase in _PROBLEMS]
    parts = [f"backing up {describe_disk(d)}" for d in active]
    if waiting:
        labels = ", ".join(d.label for d in waiting)
        parts.append(f"locked: disk {labels} waits — run `zbackupd unlock`")
    parts.extend(describe_disk(d) for d in problems)
    if status.locked and status.notice:
        parts.append(status.notice)
    if not parts:
        state = "locked (run `zbackupd unlock`)" if status.locked else "idle, waiting for a disk"
        finished = [d for d in status.disks if d.last_result is not None]
        last = "; ".join(f"{d.label}: {d.last_result}" for d in finished)
        parts.append(f"{state}{' — last: ' + last if last else ''}")
    elif status.locked and not waiting:
        parts.insert(0, "locked")
    parts.extend(f"stale: {note}" for note in status.stale)
    return "; ".join(parts)


def as_dict(status: DaemonStatus) -> dict[str, Any]:
    """``zbackupd status --json``: stable keys, plain values."""
    return {
        "locked": status.locked,
        "notice": status.notice,
        "stale": list(status.stale),
        "summary": status_line(status),
        "disks": [
            {
                "label": d.label,
                "serial": d.serial,
                "phase": d.phase.value,
                "run_id": d.run_id,
                "message": d.message,
                "last_result": d.last_result,
                "last_success": d.last_success,
                "progress": None if d.progress is None else {
                    "dataset": d.progress.dataset,
                    "bytes_done": d.progress.bytes_done,
                    "bytes_total": d.progress.bytes_total,
                    "rate": d.progress.rate,
                    "eta_seconds": d.progress.eta_seconds,
                },
            }
            for d in status.disks
        ],
    }
