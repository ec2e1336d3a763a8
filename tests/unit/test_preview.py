"""``zbackupd plan``: the next plug-in's sends, from the server's listing alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from zbackupd.config import load_config
from zbackupd.core.model import Bookmark, DatasetState, Snapshot
from zbackupd.errors import TransientError
from zbackupd.service.preview import preview_dataset, preview_disk
from zbackupd.zfs.runner import CommandResult

REPO = Path(__file__).resolve().parents[2]
S1 = Snapshot("tank/a@zbackupd_20260101T000000Z", 11, 100)
S2 = Snapshot("tank/a@zbackupd_20260102T000000Z", 12, 200)
CURSOR_AT_S1 = Bookmark("tank/a#zbackupd_offsite-a:11", 11, 100)
CURSOR_AT_S2 = Bookmark("tank/a#zbackupd_offsite-a:12", 12, 200)
STATE = DatasetState("tank/a", (S1, S2))


def test_no_cursor_of_this_disk_means_a_full_send_of_the_newest() -> None:
    got = preview_dataset(STATE, (), (S1, S2), creates_snapshots=False, written=0)
    assert (got.action, got.base, got.target) == ("full", None, S2.name)


def test_a_cursor_behind_the_newest_means_an_increment_from_it() -> None:
    got = preview_dataset(STATE, (CURSOR_AT_S1,), (S1, S2), creates_snapshots=True, written=0)
    assert (got.action, got.base, got.target, got.written) == (
        "incremental", CURSOR_AT_S1.name, S2.name, None)


def test_at_the_newest_with_nothing_written_is_up_to_date() -> None:
    got = preview_dataset(STATE, (CURSOR_AT_S2,), (S1, S2), creates_snapshots=True, written=0)
    assert got.action == "up to date"
    assert got.describe() == f"tank/a: up to date at {CURSOR_AT_S2.name}"


def test_at_the_newest_with_new_writes_the_run_snapshots_them() -> None:
    got = preview_dataset(STATE, (CURSOR_AT_S2,), (S1, S2), creates_snapshots=True,
                          written=4096)
    assert (got.action, got.written) == ("new snapshot", 4096)
    assert "a new run snapshot" in got.describe()
    reuse = preview_dataset(STATE, (CURSOR_AT_S2,), (S1, S2), creates_snapshots=False,
                            written=4096)
    assert reuse.action == "up to date"  # reuse mode takes no snapshot


class FakeRemote:
    def __init__(self, answers: dict[str, str], fail: bool = False) -> None:
        self.answers = answers
        self.fail = fail
        self.calls: list[tuple[str, ...]] = []

    async def __aenter__(self) -> FakeRemote:
        if self.fail:
            raise TransientError("SSH connection to backup.example.org:22 unavailable")
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None
                        ) -> None:
        return None

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        self.calls.append(tuple(argv))
        key = "estimate" if "-nvP" in argv else argv[5]
        return CommandResult(tuple(argv), 0, self.answers[key].encode(), "")


async def test_preview_of_a_disk_asks_the_server_and_changes_nothing() -> None:
    config = load_config(REPO / "docs/examples/minimal.toml")
    disk = config.disks[0]
    root = config.sources[0].datasets[0].root
    remote = FakeRemote({
        "filesystem,volume": f"{root}\tfilesystem\t1\toff\t-\t0\n",
        "snapshot,bookmark": (f"{root}@zbackupd_20260101T000000Z\t11\t100\t0\n"
                              f"{root}@zbackupd_20260102T000000Z\t12\t200\t0\n"
                              f"{root}#zbackupd_{disk.label}:11\t11\t100\t0\n"),
        "estimate": "incremental\tx\ty\t5000\nsize\t5000\n",
    })

    async def connect(_: Any) -> Any:
        return remote

    [source] = await preview_disk(config, disk, connect)
    [dataset] = source["datasets"]
    assert dataset["action"] == "incremental"
    assert dataset["estimated_bytes"] == 5000
    assert dataset["summary"].startswith(f"{root}: incremental from {root}#zbackupd_")
    verbs = {call[1] for call in remote.calls}
    assert verbs == {"list", "send"}  # listings and one dry-run send: nothing changed
    assert all("-nvP" in call for call in remote.calls if call[1] == "send")

    async def unreachable(_: Any) -> Any:
        return FakeRemote({}, fail=True)

    [down] = await preview_disk(config, disk, unreachable)
    assert "unavailable" in down["error"]
