"""The session's pure decisions: which datasets, where they land, which send for a step."""

from __future__ import annotations

from pathlib import Path

from zbackupd.config import load_config
from zbackupd.model import Encryption, Snapshot
from zbackupd.plan import FullSend, IncrementalSend, Resume
from zbackupd.session import select_datasets, send_argv, snapshot_filter, step_target
from zbackupd.zfs.parse import DatasetRow

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
    assert step_target(IncrementalSend(snap, newer, True)) == newer
    assert step_target(Resume("1-abc")) is None


def test_own_snapshots_are_the_send_targets_in_create_mode() -> None:
    chosen = snapshot_filter(SOURCE.datasets[0])
    assert chosen.matches(Snapshot("tank/a@zbackupd_20260101T000000Z", 1, 1))
    assert not chosen.matches(Snapshot("tank/a@autosnap_daily", 2, 2))
