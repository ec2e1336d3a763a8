"""What the admin hears without asking: the metrics file, stale-disk warnings and the
alert hook, after every run, on unlock, at start and every hour.

Built on the pure ``core.report`` (the same reports ``zbackupd status`` prints). Nothing
here can stop the daemon: a metrics file that cannot be written or a hook that fails is
logged (the hook's failure at ``err`` priority, with the reason) and the daemon goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from zbackupd.config import Config
from zbackupd.core.report import DiskReport, disk_reports
from zbackupd.service import metrics
from zbackupd.service.hooks import (
    Alert,
    AlertEvent,
    HookFailed,
    HookRunner,
    events_from,
    run_hook,
    stale_alerts,
)
from zbackupd.service.store import RunRecord, StateStore, run_outcome
from zbackupd.zfs.runner import run_with_input

log = structlog.get_logger(__name__)

#: How often stale disks are looked for while nothing happens.
CHECK_INTERVAL_SECONDS = 3600.0


def reports_from_store(config: Config, store: StateStore, now: float) -> tuple[DiskReport, ...]:
    """Every configured disk's report from the state store (what ``status`` prints)."""
    successes = {disk.label: store.last_success(disk.label) for disk in config.disks}
    return disk_reports(
        [disk.identity for disk in config.disks],
        {label: run_outcome(record) for label, record in store.last_runs().items()},
        {label: run_outcome(record) for label, record in successes.items() if record},
        now=now,
        stale_after_days=config.daemon.stale_disk_warning_days,
    )


def stale_notes(reports: tuple[DiskReport, ...]) -> tuple[str, ...]:
    """For the status line: ``offsite-b: no backup for 20 days``."""
    return tuple(
        f"{r.label}: no backup for {r.days_without_backup} days"
        for r in reports if r.stale
    )


class Monitor:
    def __init__(
        self,
        config: Config,
        store: StateStore,
        *,
        run: HookRunner = run_with_input,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store = store
        self._run = run
        self._clock = clock
        self._alerted_stale: frozenset[str] = frozenset()

    async def after_run(self, record: RunRecord, *, locked: bool) -> tuple[str, ...]:
        """Alert on the run's outcome, then refresh; returns the stale notes."""
        event = AlertEvent.SUCCESS if record.ok else AlertEvent.FAILURE
        disk = self.config.disk_by_label(record.disk_label)
        success = self._store.last_success(record.disk_label)
        await self._alert(Alert(event, record.disk_label, disk.serial if disk else record.serial,
                                f"disk {record.disk_label}: {record.summary}", record.run_id,
                                success.finished if success else None))
        return await self.refresh(locked=locked)

    async def refresh(self, *, locked: bool) -> tuple[str, ...]:
        """Metrics file, and a warning and alert for each disk that turned stale."""
        reports = reports_from_store(self.config, self._store, self._clock())
        path = self.config.daemon.metrics_file
        if path is not None:
            try:
                metrics.write(path, reports, locked=locked)
            except OSError as error:
                log.warning(f"metrics file {path} not written: {error.strerror or error}",
                            path=str(path), error=str(error))
        alerts, self._alerted_stale = stale_alerts(reports, self._alerted_stale)
        for alert in alerts:
            log.warning(alert.summary, disk_label=alert.disk, stale=True)
            await self._alert(alert)
        return stale_notes(reports)

    async def watch(self, locked: Callable[[], bool],
                    on_stale: Callable[[tuple[str, ...]], None]) -> None:
        """Refresh now and then every ``CHECK_INTERVAL_SECONDS`` until cancelled."""
        while True:
            on_stale(await self.refresh(locked=locked()))
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)

    async def _alert(self, alert: Alert) -> None:
        alerts = self.config.alerts
        if alerts.command is None:
            return
        try:
            await run_hook(self._run, alerts.command, alert, timeout=alerts.timeout_seconds,
                           events=events_from(alerts.on))
        except HookFailed as error:
            log.error(f"alert hook for disk {alert.disk} ({alert.event.value}) failed: {error}",
                      disk_label=alert.disk, alert_event=alert.event.value, error=str(error))
