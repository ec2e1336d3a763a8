"""The alert hook: a program the admin configures, run when a disk's run fails, when a
disk turns stale, and (if asked) on success — like borgmatic's and zrepl's hooks.

The facts reach it twice: as ``ZBACKUPD_*`` environment variables for shell one-liners
(``ZBACKUPD_EVENT``, ``ZBACKUPD_DISK``, ``ZBACKUPD_SERIAL``, ``ZBACKUPD_SUMMARY``,
``ZBACKUPD_RUN_ID``, ``ZBACKUPD_LAST_SUCCESS``) and as one JSON object on stdin. A hook
that fails or hangs is reported in the journal and never stops the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from zbackupd.core.report import DiskReport
from zbackupd.errors import ZbackupdError
from zbackupd.zfs.runner import CommandResult


class AlertEvent(Enum):
    FAILURE = "failure"
    STALE = "stale"
    SUCCESS = "success"


@dataclass(frozen=True, slots=True)
class Alert:
    event: AlertEvent
    disk: str
    serial: str
    summary: str
    run_id: str | None = None
    last_success: float | None = None


class HookFailed(ZbackupdError):
    """The hook exited non-zero, could not start or timed out; the alert may be lost."""

    transient = True

    def __init__(self, argv: Sequence[str], why: str) -> None:
        self.argv = tuple(argv)
        super().__init__(f"alert hook {self.argv[0]} failed: {why}")


def hook_environment(alert: Alert) -> dict[str, str]:
    env = {
        "ZBACKUPD_EVENT": alert.event.value,
        "ZBACKUPD_DISK": alert.disk,
        "ZBACKUPD_SERIAL": alert.serial,
        "ZBACKUPD_SUMMARY": alert.summary,
    }
    if alert.run_id is not None:
        env["ZBACKUPD_RUN_ID"] = alert.run_id
    if alert.last_success is not None:
        env["ZBACKUPD_LAST_SUCCESS"] = f"{alert.last_success:.0f}"
    return env


def hook_payload(alert: Alert) -> bytes:
    return json.dumps({
        "event": alert.event.value,
        "disk": alert.disk,
        "serial": alert.serial,
        "summary": alert.summary,
        "run_id": alert.run_id,
        "last_success": alert.last_success,
    }, sort_keys=True).encode() + b"\n"


def stale_alerts(
    reports: Sequence[DiskReport], already: frozenset[str]
) -> tuple[tuple[Alert, ...], frozenset[str]]:
    """Alerts for disks that turned stale since ``already`` (labels alerted before); a
    disk that is no longer stale may alert again next time it turns stale."""
    stale = {r.label: r for r in reports if r.stale}
    alerts = tuple(
        Alert(AlertEvent.STALE, r.label, r.serial,
              f"disk {r.label} has had no successful backup for "
              f"{r.days_without_backup} days: plug it in",
              last_success=r.last_success.finished if r.last_success else None)
        for label, r in stale.items() if label not in already
    )
    return alerts, frozenset(stale)


#: ``runner.run_with_input``'s shape: the seam tests substitute.
HookRunner = Callable[..., Awaitable[CommandResult]]


async def run_hook(
    run: HookRunner,
    argv: Sequence[str],
    alert: Alert,
    *,
    timeout: float,
    events: frozenset[AlertEvent],
) -> CommandResult | None:
    """Run the hook for ``alert`` if its event is wanted; raise ``HookFailed`` if it fails."""
    if alert.event not in events or not argv:
        return None
    try:
        result = await run(argv, stdin_data=hook_payload(alert),
                           extra_env=hook_environment(alert), timeout=timeout)
    except OSError as error:
        raise HookFailed(argv, error.strerror or str(error)) from error
    except ZbackupdError as error:  # CommandTimeout
        raise HookFailed(argv, str(error)) from error
    if result.returncode != 0:
        raise HookFailed(argv, f"exit {result.returncode}: {result.stderr.strip()[:500]}")
    return result


def events_from(names: Sequence[str]) -> frozenset[AlertEvent]:
    return frozenset(AlertEvent(name) for name in names)


