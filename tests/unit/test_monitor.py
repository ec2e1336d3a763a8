"""After a run: the alert hook hears of a failure, the metrics file is rewritten, a
stale disk is warned about once; nothing the hook does can stop the daemon."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from zbackupd.config import parse_config
from zbackupd.service.monitor import Monitor
from zbackupd.service.store import DatasetResult, RunRecord, StateStore
from zbackupd.zfs.runner import CommandResult

DAY = 86_400.0
NOW = 1_800_000_000.0


def config(tmp_path: Path, hook: str = '["/usr/local/bin/alert"]') -> Any:
    return parse_config(f"""
[daemon]
state_dir = "{tmp_path}"
metrics_file = "{tmp_path}/zbackupd.prom"
stale_disk_warning_days = 7

[alerts]
command = {hook}

[[sources]]
name = "backup"
host = "backup.example.org"
user = "zbackupd"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIUbOiy4xwbpskbVaVgiTnx+sBj4wAc8iSK2jPAcBHI4"

[[sources.datasets]]
root = "tank/backups"

[[disks]]
label = "offsite-a"
serial = "WD-A"
pool_guid = "11856427362548921357"
pool_name = "zbackup"

[[disks]]
label = "offsite-b"
serial = "WD-B"
pool_guid = "11856427362548921358"
pool_name = "zbackup"
""", source="test.toml")


class FakeHook:
    def __init__(self, returncode: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.returncode = returncode

    async def __call__(self, argv: Sequence[str], *, stdin_data: bytes,
                       extra_env: dict[str, str], timeout: float) -> CommandResult:
        self.calls.append({"argv": tuple(argv), "env": extra_env, "stdin": stdin_data})
        return CommandResult(tuple(argv), self.returncode, b"", "mail server down")


def record(label: str, finished: float, ok: bool) -> RunRecord:
    return RunRecord(f"run-{label}-{finished:.0f}", label, "WD", finished - 60, finished, ok,
                     "ok" if ok else "failed: no route to host",
                     (DatasetResult("tank/backups", "sent", 5, "zbackupd_x"),), 5)


async def test_a_failed_run_alerts_writes_metrics_and_a_stale_disk_warns_once(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    store.record_run(record("offsite-b", NOW - 10 * DAY, ok=True))  # stale: 10 > 7 days
    failed = record("offsite-a", NOW, ok=False)
    store.record_run(failed)
    hook = FakeHook()
    monitor = Monitor(config(tmp_path), store, run=hook, clock=lambda: NOW)
    with structlog.testing.capture_logs() as logs:
        notes = await monitor.after_run(failed, locked=False)
    assert notes == ("offsite-b: no backup for 10 days",)
    events = [(c["env"]["ZBACKUPD_EVENT"], c["env"]["ZBACKUPD_DISK"]) for c in hook.calls]
    assert events == [("failure", "offsite-a"), ("stale", "offsite-b")]
    assert "no route to host" in hook.calls[0]["env"]["ZBACKUPD_SUMMARY"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "disk offsite-b has had no successful backup for 10 days: plug it in"
    prom = (tmp_path / "zbackupd.prom").read_text()
    assert 'zbackupd_disk_stale{disk="offsite-b"} 1.0' in prom
    assert 'zbackupd_disk_last_run_success{disk="offsite-a"} 0.0' in prom

    hook.calls.clear()
    assert await monitor.refresh(locked=False) == notes
    assert hook.calls == []  # stale alerts once per transition


async def test_a_failing_hook_is_logged_at_error_and_never_raises(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    failed = record("offsite-a", time.time(), ok=False)
    store.record_run(failed)
    monitor = Monitor(config(tmp_path), store, run=FakeHook(returncode=2))
    with structlog.testing.capture_logs() as logs:
        await monitor.after_run(failed, locked=True)
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["event"].startswith("alert hook for disk offsite-a (failure) failed")
    assert "mail server down" in error["event"]


async def test_success_alerts_only_when_asked(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    good = record("offsite-a", time.time(), ok=True)
    store.record_run(good)
    hook = FakeHook()
    await Monitor(config(tmp_path), store, run=hook).after_run(good, locked=False)
    assert hook.calls == []
    cfg = config(tmp_path).model_copy(
        update={"alerts": config(tmp_path).alerts.model_copy(update={"on": ("success",)})})
    await Monitor(cfg, store, run=hook).after_run(good, locked=False)
    assert [c["env"]["ZBACKUPD_EVENT"] for c in hook.calls] == ["success"]
