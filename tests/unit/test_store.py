"""State survives restarts, is replaced atomically, and a corrupt file is a clear error."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from zbackupd.keys.secret import write_file_atomically
from zbackupd.service.store import (
    HISTORY_PER_DISK,
    DatasetResult,
    RunRecord,
    StateCorrupt,
    StateStore,
)


def run(n: int, ok: bool = True, label: str = "a") -> RunRecord:
    return RunRecord(
        run_id=f"r{n}", disk_label=label, serial="S", started=n, finished=n + 1, ok=ok,
        summary="ok" if ok else "failed", datasets=(DatasetResult("tank/x", "sent", 10, "s1"),),
        bytes_sent=10,
    )


def test_round_trip_and_last_success(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_run(run(1))
    store.record_run(run(2, ok=False))
    reopened = StateStore(tmp_path)
    assert reopened.history("a") == [run(1), run(2, ok=False)]
    assert reopened.last_runs() == {"a": run(2, ok=False)}
    assert reopened.last_success("a") == run(1)
    assert reopened.last_seen() == {"a": 3}


def test_history_is_bounded(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for n in range(HISTORY_PER_DISK + 5):
        store.record_run(run(n))
    history = store.history("a")
    assert len(history) == HISTORY_PER_DISK
    assert history[-1] == run(HISTORY_PER_DISK + 4)


def test_file_is_private_and_no_temp_files_remain(tmp_path: Path) -> None:
    StateStore(tmp_path).record_run(run(1))
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_file_atomically(target, b"old", overwrite=True)

    with pytest.raises(TypeError):  # the write itself fails half-way through the protocol
        write_file_atomically(target, "not bytes", overwrite=True)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_corrupt_state_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{ half")
    with pytest.raises(StateCorrupt, match=r"state\.json: unreadable state"):
        StateStore(tmp_path).history("a")
