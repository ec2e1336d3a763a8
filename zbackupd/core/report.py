"""When was each disk last backed up, and is that too long ago: the admin's question, pure.

``zbackupd status`` answers it from the state store whether the daemon runs or not, for
every configured disk, also one never seen. The exit code makes it a monitoring check:

- ``0``: every disk's last run succeeded and none is stale;
- ``1``: some disk's last run failed (or was refused, or the disk was pulled);
- ``2``: no failure, but some disk is stale (no success for ``stale_disk_warning_days``)
  or has never been backed up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from zbackupd.core.model import DiskIdentity
from zbackupd.core.status import human_duration

EXIT_ALL_GOOD = 0
EXIT_LAST_RUN_FAILED = 1
EXIT_STALE = 2
DAY_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What the report needs of one finished run (the store's ``RunRecord``, trimmed)."""

    started: float
    finished: float
    ok: bool
    summary: str
    #: (server dataset, snapshot short name) the disk held after the run
    newest_snapshots: tuple[tuple[str, str], ...] = ()
    bytes_sent: int = 0


@dataclass(frozen=True, slots=True)
class DiskReport:
    label: str
    serial: str
    last_run: RunOutcome | None
    last_success: RunOutcome | None
    #: seconds since the last success finished (None: never backed up)
    age_seconds: float | None
    stale: bool

    @property
    def failed(self) -> bool:
        return self.last_run is not None and not self.last_run.ok

    @property
    def never_backed_up(self) -> bool:
        return self.last_success is None

    @property
    def days_without_backup(self) -> int:
        """Whole days since the last success finished (0 when there was none)."""
        return int((self.age_seconds or 0) // DAY_SECONDS)


def disk_reports(
    disks: Sequence[DiskIdentity],
    last_runs: Mapping[str, RunOutcome],
    last_successes: Mapping[str, RunOutcome],
    *,
    now: float,
    stale_after_days: int,
) -> tuple[DiskReport, ...]:
    """One report per configured disk, in configuration order. ``stale_after_days`` 0
    turns the stale warning off (a never-backed-up disk is still reported)."""
    reports = []
    for disk in disks:
        success = last_successes.get(disk.label)
        age = None if success is None else max(0.0, now - success.finished)
        stale = (
            stale_after_days > 0 and age is not None and age > stale_after_days * DAY_SECONDS
        )
        reports.append(
            DiskReport(disk.label, disk.serial, last_runs.get(disk.label), success, age, stale)
        )
    return tuple(reports)


def exit_code(reports: Sequence[DiskReport]) -> int:
    if any(report.failed for report in reports):
        return EXIT_LAST_RUN_FAILED
    if any(report.stale or report.never_backed_up for report in reports):
        return EXIT_STALE
    return EXIT_ALL_GOOD


def _when(epoch: float) -> str:
    return f"{datetime.fromtimestamp(epoch, UTC):%Y-%m-%d %H:%M} UTC"


def describe_age(report: DiskReport) -> str:
    """``2026-11-20 10:00 UTC (10d ago)``, ``never``; ``STALE`` when too old."""
    if report.last_success is None or report.age_seconds is None:
        return "never"
    age = human_duration(report.age_seconds)
    days, rest = divmod(int(report.age_seconds), DAY_SECONDS)
    if days:
        age = f"{days}d{rest // 3600:02d}h"
    text = f"{_when(report.last_success.finished)} ({age} ago)"
    return f"{text} STALE" if report.stale else text


def describe_holds(report: DiskReport) -> str:
    """What the disk holds since its last success: the snapshot names (one when they
    are all the same run snapshot)."""
    if report.last_success is None or not report.last_success.newest_snapshots:
        return "-"
    shorts = sorted({short for _, short in report.last_success.newest_snapshots})
    return shorts[0] if len(shorts) == 1 else ", ".join(shorts)


def render_table(reports: Sequence[DiskReport], phases: Mapping[str, str]) -> list[str]:
    """Lines of ``zbackupd status``: one per disk, and the failure of a failed last run."""
    rows = [("DISK", "SERIAL", "NOW", "LAST SUCCESS", "HOLDS")]
    for report in reports:
        rows.append((report.label, report.serial, phases.get(report.label, "-"),
                     describe_age(report), describe_holds(report)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
             + "  " + row[-1] for row in rows]
    for report in reports:
        if report.failed and report.last_run is not None:
            lines.append(f"{report.label}: last run {_when(report.last_run.finished)} "
                         f"{report.last_run.summary}")
        elif report.stale:
            lines.append(f"{report.label}: no backup for {report.days_without_backup} days: "
                         "plug it in")
    return lines


def reports_as_dict(reports: Sequence[DiskReport]) -> list[dict[str, Any]]:
    """The per-disk part of ``zbackupd status --json``."""

    def run(outcome: RunOutcome | None) -> dict[str, Any] | None:
        if outcome is None:
            return None
        return {
            "started": outcome.started,
            "finished": outcome.finished,
            "ok": outcome.ok,
            "summary": outcome.summary,
            "newest_snapshots": dict(outcome.newest_snapshots),
        }

    return [
        {
            "label": report.label,
            "serial": report.serial,
            "last_run": run(report.last_run),
            "last_successful_run": run(report.last_success),
            "age_seconds": report.age_seconds,
            "stale": report.stale,
            "failed": report.failed,
            "never_backed_up": report.never_backed_up,
        }
        for report in reports
    ]
