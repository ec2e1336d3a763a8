"""The status line systemd shows: always meaningful, most important first."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zbackupd.core.status import (
    DaemonStatus,
    DiskStatus,
    Phase,
    Progress,
    as_dict,
    human_bytes,
    human_duration,
    status_line,
)


def disk(phase: Phase, label: str = "offsite-a", **kw: Any) -> DiskStatus:
    return DiskStatus(label=label, serial="S1", phase=phase, **kw)


def test_locked_with_nothing_attached() -> None:
    assert status_line(DaemonStatus(locked=True)) == "locked (run `zbackupd unlock`)"


def test_idle_shows_last_results() -> None:
    status = DaemonStatus(locked=False).with_disk(disk(Phase.DONE, last_result="ok at 10:00"))
    assert status_line(status) == "idle, waiting for a disk — last: offsite-a: ok at 10:00"


def test_transfer_shows_dataset_bytes_rate_eta() -> None:
    progress = Progress("tank/home", 512 * 2**20, 1536 * 2**20, 64 * 2**20, 0, 3)
    status = DaemonStatus(locked=False).with_disk(disk(Phase.TRANSFERRING, progress=progress))
    assert status_line(status) == (
        "backing up offsite-a: tank/home (1/3) 512.0 MiB/1.5 GiB at 64.0 MiB/s, ETA 16s"
    )


def test_waiting_for_unlock_says_what_to_do() -> None:
    status = DaemonStatus(locked=True).with_disk(disk(Phase.WAITING_FOR_UNLOCK))
    assert status_line(status) == "locked: disk offsite-a waits — run `zbackupd unlock`"


def test_problems_are_shown_with_their_remedy() -> None:
    status = DaemonStatus(locked=False).with_disk(
        disk(Phase.SUSPENDED, message="disk pulled mid-write: re-plug disk offsite-a to finish")
    )
    assert "re-plug disk offsite-a to finish" in status_line(status)
    assert "\n" not in status_line(status)


def test_two_disks_at_once_are_both_shown() -> None:
    status = (
        DaemonStatus(locked=False)
        .with_disk(disk(Phase.IMPORTING, label="b"))
        .with_disk(disk(Phase.PLANNING, label="a"))
    )
    assert status_line(status) == "backing up a: planning; backing up b: importing"


def test_json_form_is_serialisable_and_complete() -> None:
    progress = Progress("tank/home", 10, None, 0.0)
    status = DaemonStatus(locked=False).with_disk(disk(Phase.TRANSFERRING, progress=progress))
    data = json.loads(json.dumps(as_dict(status)))
    assert data["disks"][0]["phase"] == "transferring"
    assert data["disks"][0]["progress"]["eta_seconds"] is None
    assert data["summary"] == status_line(status)


@pytest.mark.parametrize(
    ("count", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3 * 2**30, "3.0 GiB")]
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (65, "1m05s"), (3725, "1h02m")])
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


def test_refused_unlock_is_shown_while_locked() -> None:
    notice = "unlock refused at 10:00: wrong passphrase — no disk was touched"
    status = DaemonStatus(locked=True, notice=notice).with_disk(disk(Phase.WAITING_FOR_UNLOCK))
    assert status_line(status) == (
        "locked: disk offsite-a waits — run `zbackupd unlock`; " + notice
    )
    assert "wrong passphrase" not in status_line(DaemonStatus(locked=False, notice=notice))


def test_a_stale_disk_is_named_in_the_status_line_whatever_else_happens() -> None:
    status = DaemonStatus(locked=False, stale=("offsite-b: no backup for 20 days",))
    assert status_line(status) == (
        "idle, waiting for a disk; stale: offsite-b: no backup for 20 days"
    )
    assert as_dict(status)["stale"] == ["offsite-b: no backup for 20 days"]
