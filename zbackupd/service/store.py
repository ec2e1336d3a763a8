"""Run history and per-disk facts in the state directory, written atomically.

One JSON file (``state.json``), replaced by ``secret.write_file_atomically`` (temp file,
fsync, rename, fsync of the directory),
so a crash or power cut leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zbackupd.core.report import RunOutcome
from zbackupd.errors import PermanentError
from zbackupd.keys.secret import ensure_private_dir, write_file_atomically

STATE_VERSION = 1
HISTORY_PER_DISK = 50


class StateCorrupt(PermanentError):
    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: unreadable state ({reason}); move it aside to start afresh")


@dataclass(frozen=True, slots=True)
class DatasetResult:
    dataset: str
    outcome: str  # "sent", "up to date", "resumed", "conflict: …", "failed: …"
    bytes_sent: int = 0
    newest_snapshot: str | None = None


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    disk_label: str
    serial: str
    started: float
    finished: float
    ok: bool
    summary: str
    datasets: tuple[DatasetResult, ...] = field(default_factory=tuple)
    bytes_sent: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        datasets = tuple(DatasetResult(**d) for d in data.get("datasets", ()))
        return cls(**{**data, "datasets": datasets})


class StateStore:
    """Keeps the last runs of every disk and when each disk was last seen."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"version": STATE_VERSION, "runs": {}, "last_seen": {}}
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise StateCorrupt(self.path, str(error)) from error
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise StateCorrupt(self.path, f"unknown state version {data.get('version')!r}")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        ensure_private_dir(self.path.parent)
        write_file_atomically(
            self.path, json.dumps(data, indent=1, sort_keys=True).encode(), overwrite=True
        )

    def record_run(self, record: RunRecord) -> None:
        data = self._load()
        runs = data["runs"].setdefault(record.disk_label, [])
        runs.append(asdict(record))
        del runs[:-HISTORY_PER_DISK]
        data["last_seen"][record.disk_label] = record.finished
        self._save(data)

    def history(self, disk_label: str) -> list[RunRecord]:
        return [RunRecord.from_dict(r) for r in self._load()["runs"].get(disk_label, [])]

    def last_runs(self) -> dict[str, RunRecord]:
        runs = self._load()["runs"]
        return {label: RunRecord.from_dict(items[-1]) for label, items in runs.items() if items}

    def last_success(self, disk_label: str) -> RunRecord | None:
        successes = [r for r in self.history(disk_label) if r.ok]
        return successes[-1] if successes else None

    def mark_seen(self, disk_label: str, when: float) -> None:
        data = self._load()
        data["last_seen"][disk_label] = when
        self._save(data)

    def last_seen(self) -> dict[str, float]:
        seen: dict[str, float] = self._load()["last_seen"]
        return seen


def run_outcome(record: RunRecord) -> RunOutcome:
    """The part of a stored run the status report needs."""
    return RunOutcome(
        started=record.started,
        finished=record.finished,
        ok=record.ok,
        summary=record.summary,
        newest_snapshots=tuple(
            (result.dataset, result.newest_snapshot)
            for result in record.datasets
            if result.newest_snapshot is not None
        ),
        bytes_sent=record.bytes_sent,
    )
