"""The alert hook runs for real: the facts in its environment and as JSON on stdin; a
failing or hanging hook is a typed error, never a hang."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from zbackupd.core.model import DiskIdentity
from zbackupd.core.report import DAY_SECONDS, DiskReport, RunOutcome, disk_reports
from zbackupd.service.hooks import (
    Alert,
    AlertEvent,
    HookFailed,
    run_hook,
    stale_alerts,
)
from zbackupd.zfs.runner import run_with_input

ALL = frozenset(AlertEvent)
FAILURE = Alert(AlertEvent.FAILURE, "offsite-a", "WD-1", "failed: server down", "run-1", 1.0)


async def test_the_hook_gets_the_facts_in_env_and_json(tmp_path: Path) -> None:
    out = tmp_path / "hook.out"
    script = (
        "import json, os, sys\n"
        f"open({str(out)!r}, 'w').write(json.dumps({{'env': {{k: v for k, v in "
        "os.environ.items() if k.startswith('ZBACKUPD_')}, 'stdin': json.load(sys.stdin)}))\n"
    )
    await run_hook(run_with_input, [sys.executable, "-c", script], FAILURE, timeout=30,
                   events=ALL)
    seen = json.loads(out.read_text())
    assert seen["env"] == {
        "ZBACKUPD_EVENT": "failure", "ZBACKUPD_DISK": "offsite-a", "ZBACKUPD_SERIAL": "WD-1",
        "ZBACKUPD_SUMMARY": "failed: server down", "ZBACKUPD_RUN_ID": "run-1",
        "ZBACKUPD_LAST_SUCCESS": "1",
    }
    assert seen["stdin"]["event"] == "failure"
    assert seen["stdin"]["summary"] == "failed: server down"


async def test_an_unwanted_event_runs_nothing() -> None:
    assert await run_hook(run_with_input, ["/nonexistent"], FAILURE, timeout=5,
                          events=frozenset({AlertEvent.STALE})) is None


async def test_a_failing_missing_or_hanging_hook_is_a_typed_error() -> None:
    with pytest.raises(HookFailed, match="exit 3: nope"):
        await run_hook(run_with_input,
                       [sys.executable, "-c", "import sys; sys.stderr.write('nope'); sys.exit(3)"],
                       FAILURE, timeout=30, events=ALL)
    with pytest.raises(HookFailed, match="No such file"):
        await run_hook(run_with_input, ["/nonexistent/hook"], FAILURE, timeout=5, events=ALL)
    with pytest.raises(HookFailed, match=r"did not finish within 0\.5s"):
        await run_hook(run_with_input, [sys.executable, "-c", "import time; time.sleep(30)"],
                       FAILURE, timeout=0.5, events=ALL)


def test_a_disk_alerts_once_when_it_turns_stale_and_again_after_recovering() -> None:
    now = 1_800_000_000.0
    disk = DiskIdentity("WD-1", 1, "p", "offsite-a")

    def reports(days: float) -> tuple[DiskReport, ...]:
        success = {"offsite-a": RunOutcome(0, now - days * DAY_SECONDS, True, "ok")}
        return disk_reports([disk], success, success, now=now, stale_after_days=14)

    alerts, seen = stale_alerts(reports(20), frozenset())
    assert [(a.event, a.disk) for a in alerts] == [(AlertEvent.STALE, "offsite-a")]
    assert "20 days" in alerts[0].summary
    assert stale_alerts(reports(21), seen)[0] == ()
    _, seen = stale_alerts(reports(1), seen)
    assert seen == frozenset()
    assert len(stale_alerts(reports(15), seen)[0]) == 1
