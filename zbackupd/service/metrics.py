"""Prometheus node_exporter textfile: each disk's last success, last run and staleness.

Written after every run and state change (and when a disk turns stale) to the
configured ``metrics_file`` (``*.prom``), atomically (``prometheus_client`` writes a
temporary file beside it and renames it), so node_exporter never reads half a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest, write_to_textfile

from zbackupd.core.report import DiskReport


def registry_for(reports: Sequence[DiskReport], *, locked: bool) -> CollectorRegistry:
    """The gauges for ``reports`` in a registry of their own (never the global one)."""
    registry = CollectorRegistry(auto_describe=True)

    def gauge(name: str, text: str) -> Gauge:
        return Gauge(f"zbackupd_{name}", text, ["disk"], registry=registry)

    last_success = gauge("disk_last_success_timestamp_seconds",
                         "When the disk's last successful run finished (0: never).")
    last_run = gauge("disk_last_run_timestamp_seconds",
                     "When the disk's last run finished (0: never).")
    last_ok = gauge("disk_last_run_success", "1 if the disk's last run succeeded, else 0.")
    last_bytes = gauge("disk_last_run_bytes", "Bytes received by the disk's last run.")
    duration = gauge("disk_last_run_duration_seconds", "How long the disk's last run took.")
    stale = gauge("disk_stale", "1 if the disk has had no success for stale_disk_warning_days.")
    never = gauge("disk_never_backed_up", "1 if the disk has never been backed up.")
    for report in reports:
        disk = report.label
        success, run = report.last_success, report.last_run
        last_success.labels(disk).set(success.finished if success else 0)
        last_run.labels(disk).set(run.finished if run else 0)
        last_ok.labels(disk).set(1 if run is not None and run.ok else 0)
        last_bytes.labels(disk).set(run.bytes_sent if run else 0)
        duration.labels(disk).set(max(0.0, run.finished - run.started) if run else 0)
        stale.labels(disk).set(1 if report.stale else 0)
        never.labels(disk).set(1 if report.never_backed_up else 0)
    Gauge("zbackupd_locked", "1 while the daemon waits for `zbackupd unlock`.",
          registry=registry).set(1 if locked else 0)
    return registry


def render(reports: Sequence[DiskReport], *, locked: bool) -> str:
    """The textfile's content (what ``write`` puts in the file)."""
    return generate_latest(registry_for(reports, locked=locked)).decode()


def write(path: Path, reports: Sequence[DiskReport], *, locked: bool) -> None:
    """Replace ``path`` atomically with the current gauges."""
    write_to_textfile(str(path), registry_for(reports, locked=locked))
