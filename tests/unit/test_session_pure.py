"""The session's pure decisions: which datasets, where they land, which send for a step."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from zbackupd.config import load_config
from zbackupd.core.model import Encryption, Snapshot
from zbackupd.core.plan import FullSend, IncrementalSend, Resume
from zbackupd.service.pool import Revival, revive_pool, revive_steps
from zbackupd.service.source_run import (
    run_snapshot_short_name,
    select_datasets,
    snapshot_batches,
    up_to,
)
from zbackupd.service.steps import held_snapshot_name, send_argv, snapshot_filter
from zbackupd.zfs.parse import DatasetRow, PoolHealth
from zbackupd.zfs.runner import CommandResult, CommandTimeout

REPO = Path(__file__).resolve().parents[2]
CONFIG = load_config(REPO / "docs/examples/minimal.toml")
DISK = CONFIG.disks[0]
SOURCE = CONFIG.sources[0]


def row(name: str, encrypted: bool) -> DatasetRow:
    mode = Encryption.ENCRYPTED if encrypted else Encryption.PLAIN
    return DatasetRow(name, 1, mode, name if encrypted else None)


def test_selected_datasets_land_under_source_name_parents_first() -> None:
    rows = [row("tank/backups/b", False), row("tank/backups", True), row("tank/other", False)]
    selected = select_datasets(DISK, SOURCE, rows)
    assert [(s.name, s.target, s.encryption) for s in selected] == [
        ("tank/backups", "zbackup/backup/backup/tank/backups", Encryption.ENCRYPTED),
        ("tank/backups/b", "zbackup/backup/backup/tank/backups/b", Encryption.PLAIN),
    ]


def test_send_mode_follows_the_source_encryption() -> None:
    snap = Snapshot("tank/a@zbackupd_20260101T000000Z", 7, 10)
    newer = Snapshot("tank/a@zbackupd_20260102T000000Z", 8, 11)
    assert "-w" in send_argv(FullSend(snap), Encryption.ENCRYPTED)
    plain = send_argv(FullSend(snap), Encryption.PLAIN)
    assert "-w" not in plain
    assert "-e" not in plain
    assert {"-L", "-c"} <= set(plain)
    incremental = send_argv(IncrementalSend(snap, newer, True), Encryption.ENCRYPTED)
    assert incremental[-3:] == ("-I", snap.name, newer.name)
    assert held_snapshot_name(IncrementalSend(snap, newer, True)) == newer.name
    assert held_snapshot_name(FullSend(snap)) == snap.name


def test_a_resume_holds_the_snapshot_its_token_continues() -> None:
    from tests.unit.test_argv import REAL_TOKEN  # noqa: PLC0415 -- one captured token

    assert held_snapshot_name(Resume(REAL_TOKEN)) == "pool1/test@a"
    assert held_snapshot_name(Resume("1-abc")) is None  # the resume reports the bad token


def test_own_snapshots_are_the_send_targets_in_create_mode() -> None:
    chosen = snapshot_filter(SOURCE.datasets[0])
    assert chosen.matches(Snapshot("tank/a@zbackupd_20260101T000000Z", 1, 1))
    assert not chosen.matches(Snapshot("tank/a@autosnap_daily", 2, 2))


class ScriptedRunner:
    """Answers each argv by its subcommand: (return code, stderr[, stdout]), or None for
    a timeout."""

    def __init__(self, answers: dict[str, tuple[int, str] | tuple[int, str, str] | None]
                 ) -> None:
        self.answers = answers
        self.calls: list[tuple[tuple[str, ...], float | None]] = []

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin_secret: bytearray | None = None,
        stdin_fd: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        self.calls.append((tuple(argv), timeout))
        answer = self.answers[argv[1]]
        if answer is None:
            raise CommandTimeout(argv, timeout or 0.0)
        stdout = answer[2] if len(answer) == 3 else ""
        return CommandResult(tuple(argv), answer[0], stdout.encode(), answer[1])


CAPTURES = REPO / "tests/data/zfs-output"
#: Real ``zpool list`` output (OpenZFS 2.3.2 in the VM): spool SUSPENDED, xpool ONLINE.
SUSPENDED_LISTING = (CAPTURES / "zpool-list-suspended.stdout").read_text()


def test_every_revival_reopens_before_it_clears() -> None:
    """``clear`` alone leaves a SUSPENDED pool on the dead device (seen in the VM)."""
    assert [a[1] for a in revive_steps("p")] == ["reopen", "clear"]


async def test_revive_pool_notes_the_health_then_reopens_and_clears_bounded() -> None:
    runner = ScriptedRunner({"list": (0, "", SUSPENDED_LISTING), "reopen": (0, ""),
                             "clear": (0, "")})
    revival = await revive_pool(runner, "spool", timeout=7.0)
    assert revival == Revival(PoolHealth.SUSPENDED, ())
    assert [(argv[1], argv[-1], limit) for argv, limit in runner.calls] == [
        ("list", "spool", 7.0), ("reopen", "spool", 7.0), ("clear", "spool", 7.0),
    ]


async def test_revive_pool_reports_a_hung_listing_and_a_failed_clear() -> None:
    runner = ScriptedRunner(
        {"list": None, "reopen": (0, ""), "clear": (1, "cannot clear errors for zbk-a: I/O error")}
    )
    revival = await revive_pool(runner, "zbk-a", timeout=1.0)
    assert revival.health_before is None
    assert len(revival.problems) == 1
    assert "I/O error" in revival.problems[0]
    assert [argv[1] for argv, _ in runner.calls] == ["list", "reopen", "clear"]


async def test_revive_pool_reports_a_hung_reopen_and_still_clears() -> None:
    runner = ScriptedRunner({"list": (0, "", SUSPENDED_LISTING), "reopen": None,
                             "clear": (0, "")})
    revival = await revive_pool(runner, "xpool", timeout=1.0)
    assert revival.health_before is PoolHealth.ONLINE
    assert len(revival.problems) == 1
    assert "did not finish within 1s" in revival.problems[0]
    assert [argv[1] for argv, _ in runner.calls] == ["list", "reopen", "clear"]


def test_a_run_sends_its_own_snapshot_not_a_concurrent_runs_newer_one() -> None:
    listing = [
        Snapshot("tank/a@old", 1, 10),
        Snapshot("tank/a@zbackupd_20261122T042539Z", 2, 20),
        Snapshot("tank/a@zbackupd_20261122T042541Z", 3, 30),  # another disk's run
        Snapshot("tank/b@zbackupd_20261122T042539Z", 4, 21),
    ]
    mine = up_to(listing, "tank/a", "zbackupd_20261122T042539Z")
    assert [s.guid for s in mine] == [1, 2]
    assert [s.guid for s in up_to(listing, "tank/a", None)] == [1, 2, 3]
    assert [s.guid for s in up_to(listing, "tank/b", "zbackupd_20261122T042539Z")] == [4]


def test_run_snapshot_name_only_in_create_mode() -> None:
    when = datetime(2026, 11, 22, 4, 25, 39, tzinfo=UTC)
    create = SOURCE.datasets[0]
    assert run_snapshot_short_name(create, when) == "zbackupd_20261122T042539Z"
    reuse = create.model_copy(update={"snapshots": "reuse", "reuse_pattern": "autosnap_*"})
    assert run_snapshot_short_name(reuse, when) is None


def test_the_run_snapshot_is_one_command_unless_it_would_not_fit() -> None:
    few = [f"tank/a/d{n}@zbackupd_20260101T000000Z" for n in range(300)]
    assert snapshot_batches(few) == (tuple(few),)
    batches = snapshot_batches(few, limit=4000)
    assert [name for batch in batches for name in batch] == few
    assert all(len(" ".join(("zfs", "snapshot", *batch))) <= 4000 for batch in batches)
    assert len(batches) == 3
    assert snapshot_batches([]) == ()
