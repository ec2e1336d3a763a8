"""``zbackupd status``: every configured disk's last success and age, from the state store,
with or without the daemon; the exit code as a monitoring check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zbackupd.cli import main
from zbackupd.core.model import DiskIdentity
from zbackupd.core.report import (
    DAY_SECONDS,
    EXIT_ALL_GOOD,
    EXIT_LAST_RUN_FAILED,
    EXIT_STALE,
    RunOutcome,
    describe_age,
    disk_reports,
    exit_code,
    render_table,
)
from zbackupd.service.store import DatasetResult, RunRecord, StateStore

NOW = 1_800_000_000.0
A = DiskIdentity("SER-A", 1, "zbackup", "offsite-a")
B = DiskIdentity("SER-B", 2, "zbackup", "offsite-b")


def outcome(days_ago: float, ok: bool = True) -> RunOutcome:
    finished = NOW - days_ago * DAY_SECONDS
    return RunOutcome(finished - 60, finished, ok, "ok" if ok else "failed: server down",
                      (("tank/x", "zbackupd_20261120T100000Z"),))


def test_a_fresh_success_is_all_good() -> None:
    reports = disk_reports([A], {"offsite-a": outcome(1)}, {"offsite-a": outcome(1)},
                           now=NOW, stale_after_days=14)
    assert exit_code(reports) == EXIT_ALL_GOOD
    assert not reports[0].stale
    assert describe_age(reports[0]).endswith("(1d00h ago)")


def test_a_disk_never_seen_is_listed_and_not_all_good() -> None:
    reports = disk_reports([A, B], {"offsite-a": outcome(1)}, {"offsite-a": outcome(1)},
                           now=NOW, stale_after_days=14)
    assert [r.label for r in reports] == ["offsite-a", "offsite-b"]
    assert reports[1].never_backed_up
    assert describe_age(reports[1]) == "never"
    assert exit_code(reports) == EXIT_STALE


def test_stale_after_the_configured_days_and_zero_turns_it_off() -> None:
    old = {"offsite-a": outcome(20)}
    assert disk_reports([A], old, old, now=NOW, stale_after_days=14)[0].stale
    assert not disk_reports([A], old, old, now=NOW, stale_after_days=30)[0].stale
    assert not disk_reports([A], old, old, now=NOW, stale_after_days=0)[0].stale


def test_a_failed_last_run_wins_and_keeps_the_last_success() -> None:
    reports = disk_reports([A], {"offsite-a": outcome(1, ok=False)},
                           {"offsite-a": outcome(3)}, now=NOW, stale_after_days=14)
    assert exit_code(reports) == EXIT_LAST_RUN_FAILED
    assert reports[0].last_success == outcome(3)
    lines = render_table(reports, {})
    assert "zbackupd_20261120T100000Z" in lines[1]
    assert lines[-1].startswith("offsite-a: last run ")
    assert "server down" in lines[-1]


CONFIG = """
[daemon]
state_dir = "{state}"
control_socket = "{state}/control.sock"
stale_disk_warning_days = 7

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
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "zbackupd.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    return path


def record(label: str, days_ago: float, ok: bool) -> RunRecord:
    finished = time.time() - days_ago * DAY_SECONDS
    return RunRecord(f"run-{label}", label, "WD", finished - 30, finished, ok,
                     "ok" if ok else "failed: no route to host",
                     (DatasetResult("tank/backups", "sent", 5, "zbackupd_20261101T000000Z"),))


def test_status_with_the_daemon_down_reads_the_state_file(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = StateStore(config_file.parent / "state")
    store.record_run(record("offsite-a", 2, ok=True))
    assert main(["--config", str(config_file), "status"]) == EXIT_STALE  # offsite-b: never
    out = capsys.readouterr().out
    assert out.startswith("daemon not running")
    assert "offsite-a" in out
    assert "(2d00h ago)" in out
    assert "offsite-b" in out
    assert "never" in out

    store.record_run(record("offsite-a", 1, ok=False))
    assert main(["--config", str(config_file), "status", "--json"]) == EXIT_LAST_RUN_FAILED
    document = json.loads(capsys.readouterr().out)
    assert document["daemon_running"] is False
    a, b = document["disks"]
    assert (a["label"], a["failed"], a["phase"]) == ("offsite-a", True, None)
    assert a["last_successful_run"]["newest_snapshots"] == {
        "tank/backups": "zbackupd_20261101T000000Z"
    }
    assert b["never_backed_up"] is True
