"""Issue 11, a chain that heals itself: a resume that cannot work is aborted and the run
re-plans; a full disk is pruned per policy and the step retried once; a clock far ahead
prunes nothing.

The scripted server, disk and transfer of ``test_replicate_chain`` drive the real
``DatasetReplication``; the disk here also has resume tokens, free space and destroys,
and the transfer can run out of space or be refused a resume.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import structlog
from structlog.testing import capture_logs

from tests.unit.test_argv import make_token
from tests.unit.test_replicate_chain import (
    CONFIG,
    DISK,
    LEGACY,
    SOURCE,
    TARGET,
    Event,
    FakeDisk,
    FakeServer,
    FakeStreamer,
    info,
    mark,
)
from zbackupd.config import Config
from zbackupd.config.models import Retention
from zbackupd.core.model import DatasetState, Snapshot
from zbackupd.server.prune import InUseRegistry
from zbackupd.server.remote import RemoteHost
from zbackupd.server.transfer import ProgressCallback, TransferFailed, TransferResult
from zbackupd.service.replicate import DatasetOutcome, DatasetReplication
from zbackupd.zfs import argv as zargv
from zbackupd.zfs import parse
from zbackupd.zfs.facade import Zfs
from zbackupd.zfs.runner import CommandResult, Runner

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
ESTIMATE = 5 * 1024**3
FREE = 1024**3


def day(n: int, dataset: str = "tank/a") -> Snapshot:
    """The server's run snapshot of January ``n`` 2026: guid ``n``, createtxg ``10*n``,
    created at midnight UTC that day (the server's clock)."""
    created = int(datetime(2026, 1, n, tzinfo=UTC).timestamp())
    return Snapshot(f"{dataset}@zbackupd_202601{n:02d}T000000Z", n, 10 * n, created)


def copy(snap: Snapshot) -> Snapshot:
    """``snap`` as received on the disk (its own txg, the same guid and creation)."""
    return Snapshot(f"{TARGET}@{snap.short_name}", snap.guid, 1000 + snap.createtxg,
                    snap.creation)  # fmt: skip


@dataclass
class HealServer(FakeServer):
    """Answers ``zfs send -nvP`` with a size line."""

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        argv = tuple(argv)
        if argv[:2] == ("zfs", "send") and "-nvP" in argv:
            self.events.append(argv)
            return CommandResult(argv, 0, f"size\t{ESTIMATE}\n".encode(), "")
        return await super().run(argv, check=check)


@dataclass
class HealDisk(FakeDisk):
    """A disk with resume tokens, free space and real destroys, recorded in ``events``."""

    events: list[Event] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    available: int = FREE

    async def dataset_state(self, target: str) -> DatasetState:
        token = self.tokens.get(target)
        if target not in self.copies and token is not None:
            return DatasetState(target, (), receive_resume_token=token)
        state = await super().dataset_state(target)
        return DatasetState(target, state.snapshots, receive_resume_token=token)

    async def receive_abort(self, target: str) -> None:
        self.events.append(("disk", "receive", "-A", target))
        del self.tokens[target]
        if not self.copies.get(target, True):
            del self.copies[target]

    async def available_bytes(self, dataset: str) -> int:
        self.events.append(("disk", "get", "available", dataset))
        return self.available

    async def destroy_snapshots(self, dataset: str, short_names: Sequence[str]) -> None:
        self.events.append(("disk", "destroy", dataset, *short_names))
        self.copies[dataset] = [s for s in self.copies[dataset]
                                if s.short_name not in short_names]  # fmt: skip


@dataclass
class HealStreamer(FakeStreamer):
    """Also resumes (``send -t``: lands the token's snapshot, or is refused when the
    server no longer has it), runs out of space ``full`` times, and keeps creation."""

    full: int = 0
    #: A refused resume comes from the server's gate (its own check of the token).
    gate: bool = False
    #: The full disk surfaces as the other side's error (the sender's broken pipe first).
    full_behind_send: bool = False

    async def __call__(
        self,
        remote: RemoteHost,
        send_argv: Sequence[str],
        runner: Runner,
        receive_argv: Sequence[str],
        *,
        estimated_total: int | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TransferResult:
        disk = cast(HealDisk, self.disk)
        target = receive_argv[-1]
        if self.full:
            self.full -= 1
            self.events.append(("stream", *send_argv))
            cause = parse.classify_error(tuple(receive_argv), 1,
                                         "cannot receive incremental stream: out of space\n")
            if self.full_behind_send:
                pipe = parse.classify_error(tuple(send_argv), 1, "warning: cannot send "
                                            "'tank/a@x': signal received\n")  # fmt: skip
                raise TransferFailed("send", pipe, other=cast(Any, cause), bytes_transferred=1)
            raise TransferFailed("receive", cast(Any, cause), other=None,
                                 bytes_transferred=4096)  # fmt: skip
        if "-t" in send_argv:
            self.events.append(("stream", *send_argv))
            token = zargv.decode_resume_token(send_argv[send_argv.index("-t") + 1])
            landed = next((s for s in self.server.snapshots if s.guid == token.toguid), None)
            if landed is None:
                stderr = (f"cannot resume send: '{token.toname}' used in the initial send no "
                          "longer exists\n")  # fmt: skip
                if self.gate:
                    stderr = ("zbackupd-gate: refused: cannot check the resume token's "
                              f"snapshot {token.toname}: get -H failed: exit 1: cannot open "
                              f"'{token.toname}': dataset does not exist\n")  # fmt: skip
                cause = parse.classify_error(tuple(send_argv), 255, stderr)
                raise TransferFailed("send", cast(Any, cause), other=None, bytes_transferred=0)
            disk.copies.setdefault(target, []).append(copy(landed))
            del disk.tokens[target]
            result = CommandResult(tuple(send_argv), 0, b"", "")
            return TransferResult(1 << 20, 1.0, result, result)
        before = len(disk.copies.get(target, []))
        try:
            return await super().__call__(remote, send_argv, runner, receive_argv,
                                          estimated_total=estimated_total,
                                          on_progress=on_progress)  # fmt: skip
        finally:
            by_guid = {s.guid: s for s in self.server.snapshots}
            landed_copies = disk.copies.get(target, [])
            disk.copies[target] = landed_copies[:before] + [
                copy(by_guid[s.guid]) for s in landed_copies[before:]]  # fmt: skip


@dataclass
class Heal:
    events: list[Event]
    server: HealServer
    disk: HealDisk
    streamer: HealStreamer

    def replication(self, *, now: datetime = NOW, config: Config = CONFIG) -> DatasetReplication:
        return DatasetReplication(
            config=config, disk=DISK, source=SOURCE, info=info(),
            remote=cast(RemoteHost, self.server), zfs=cast(Zfs, self.disk),
            runner=cast(Runner, None), in_use=InUseRegistry().lease("run-a"),
            now=lambda: now, report=lambda *_, **__: None, log=structlog.get_logger(),
            index=0, total=1, streamer=self.streamer,
        )  # fmt: skip

    async def run(
        self, *, now: datetime = NOW, config: Config = CONFIG,
        listing: Sequence[Snapshot] | None = None,
    ) -> tuple[DatasetOutcome, list[MutableMapping[str, Any]]]:  # fmt: skip
        """Run the replication; its outcome and the log lines it wrote."""
        snaps = self.server.snapshots if listing is None else listing
        with capture_logs() as logs:
            outcome = await self.replication(now=now, config=config).run(
                [s for s in snaps if s.dataset == "tank/a"], list(self.server.bookmarks))
        return outcome, logs

    def index(self, *prefix: str) -> int:
        return next(n for n, event in enumerate(self.events) if event[: len(prefix)] == prefix)

    def streams(self) -> list[Event]:
        return [e for e in self.events if e[0] == "stream"]

    def disk_destroys(self) -> list[Event]:
        return [e for e in self.events if e[:2] == ("disk", "destroy")]


def heal(snapshots: Sequence[Snapshot], disk: Sequence[Snapshot] = (), *,
         cursor: Snapshot | None = None, token: str | None = None) -> Heal:  # fmt: skip
    events: list[Event] = []
    marks = [mark(f"{LEGACY}:{cursor.guid}", cursor)] if cursor is not None else []
    server = HealServer(events, list(snapshots), marks)
    fake_disk = HealDisk({TARGET: [copy(s) for s in disk]} if disk else {}, events=events)
    if token is not None:
        fake_disk.tokens[TARGET] = token
    return Heal(events, server, fake_disk, HealStreamer(events, server, fake_disk))


def warnings(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(line["event"]) for line in logs if line["log_level"] == "warning"]


def with_retention(**kept: int) -> Config:
    return CONFIG.model_copy(update={"retention": Retention(**kept)})


# -- 1. resume tokens are checked, and aborted when they cannot work --------------------


async def test_a_resume_whose_snapshot_is_gone_from_the_server_is_aborted_and_replanned() -> None:
    """The partial receive of day 2 (on day 1) cannot be resumed: day 2 was destroyed on
    the server. ``zfs receive -A``, a warning that says why, then day 1 → day 3."""
    token = make_token(day(2).name, toguid=2, fromguid=1, raw=True)
    h = heal([day(1), day(3)], [day(1)], cursor=day(1), token=token)
    outcome, logs = await h.run()
    assert outcome.problem is None, outcome
    assert outcome.result.outcome == "sent"
    assert h.index("disk", "receive", "-A", TARGET) < h.index("stream")
    assert not [e for e in h.streams() if "-t" in e]
    assert [s.guid for s in h.disk.copies[TARGET]] == [1, 3]
    [warning] = [w for w in warnings(logs) if "aborted" in w]
    assert f"partial receive of {TARGET} aborted" in warning
    assert day(2).name in warning
    assert "gone from the server" in warning


async def test_a_resume_whose_source_is_only_a_bookmark_on_the_server_is_resumed() -> None:
    """Bookmarks count as a from: the resume goes ahead, nothing is aborted."""
    token = make_token(day(2).name, toguid=2, fromguid=1, raw=True)
    h = heal([day(2)], [day(1)], cursor=day(1), token=token)
    outcome, _ = await h.run()
    assert outcome.problem is None, outcome
    assert not [e for e in h.events if e[:3] == ("disk", "receive", "-A")]
    assert [e for e in h.streams() if "-t" in e]
    assert [s.guid for s in h.disk.copies[TARGET]] == [1, 2]


async def test_a_resume_whose_source_is_gone_everywhere_is_aborted() -> None:
    token = make_token(day(3).name, toguid=3, fromguid=2, raw=True)
    h = heal([day(1), day(3)], [day(1)], cursor=day(1), token=token)
    outcome, logs = await h.run()
    assert outcome.problem is None, outcome
    assert h.index("disk", "receive", "-A", TARGET) < h.index("stream")
    [warning] = [w for w in warnings(logs) if "aborted" in w]
    assert "source" in warning
    assert "guid 2" in warning


async def test_an_unreadable_resume_token_is_aborted_and_replanned() -> None:
    h = heal([day(1), day(3)], [day(1)], cursor=day(1), token="1-deadbeef-10-00ff")
    outcome, logs = await h.run()
    assert outcome.problem is None, outcome
    assert h.index("disk", "receive", "-A", TARGET) < h.index("stream")
    [warning] = [w for w in warnings(logs) if "aborted" in w]
    assert "token" in warning


async def test_a_resume_refused_at_send_time_is_aborted_and_replanned_once() -> None:
    """The listing still had day 2, but it was destroyed before ``zfs send -t`` ran."""
    token = make_token(day(2).name, toguid=2, fromguid=1, raw=True)
    h = heal([day(1), day(3)], [day(1)], cursor=day(1), token=token)
    outcome, logs = await h.run(listing=[day(1), day(2), day(3)])
    assert [e for e in h.streams() if "-t" in e]
    assert h.index("stream") < h.index("disk", "receive", "-A", TARGET)
    assert outcome.problem is None, outcome
    assert [s.guid for s in h.disk.copies[TARGET]] == [1, 3]
    [warning] = [w for w in warnings(logs) if "aborted" in w]
    assert "no longer exists" in warning


async def test_an_aborted_partial_full_receive_is_sent_afresh() -> None:
    token = make_token(day(2).name, toguid=2, raw=True)
    h = heal([day(3)], token=token)
    outcome, _ = await h.run()
    assert outcome.problem is None, outcome
    assert h.index("disk", "receive", "-A", TARGET) < h.index("stream")
    assert [s.guid for s in h.disk.copies[TARGET]] == [3]


# -- 2. a clock far ahead prunes nothing ------------------------------------------------


async def test_a_clock_three_years_ahead_prunes_nothing_and_warns() -> None:
    config = with_retention(keep_last=1, daily=3, weekly=0, monthly=0, yearly=0)
    snaps = [day(n) for n in range(1, 5)]
    h = heal(snaps, snaps, cursor=day(4))
    outcome, logs = await h.run(now=NOW + timedelta(days=3 * 365), config=config)
    assert outcome.problem is None, outcome
    assert h.disk_destroys() == []
    [warning] = [w for w in warnings(logs) if "clock" in w]
    assert "clock looks wrong" in warning
    assert "not pruning" in warning


async def test_the_same_disk_is_pruned_with_a_right_clock() -> None:
    config = with_retention(keep_last=1, daily=3, weekly=0, monthly=0, yearly=0)
    snaps = [day(n) for n in range(1, 5)]
    h = heal(snaps, snaps, cursor=day(4))
    outcome, _ = await h.run(config=config)
    assert outcome.problem is None, outcome
    assert h.disk_destroys() == [("disk", "destroy", TARGET, day(1).short_name,
                                  day(2).short_name)]  # fmt: skip


# -- 3. a full disk is pruned per policy, then the step retried once --------------------


async def test_out_of_space_prunes_the_disk_per_policy_then_retries_once() -> None:
    config = with_retention(keep_last=1, daily=0, weekly=0, monthly=0, yearly=0)
    h = heal([day(3), day(4)], [day(1), day(2), day(3)], cursor=day(3))
    h.streamer.full = 1
    outcome, _ = await h.run(config=config)
    assert outcome.problem is None, outcome
    assert outcome.result.outcome == "sent"
    first, second = h.streams()
    assert first == second
    streamed = [n for n, e in enumerate(h.events) if e[0] == "stream"]
    assert streamed[0] < h.index("disk", "destroy") < streamed[1]
    # For space: never day 3, the common base and the cursor's; after the run, the
    # policy's usual prune (day 4 is now the base) lets day 3 go.
    for_space, after_run = h.disk_destroys()
    assert for_space[3:] == (day(1).short_name, day(2).short_name)
    assert after_run[3:] == (day(3).short_name,)
    assert [s.guid for s in h.disk.copies[TARGET]] == [4]


async def test_out_of_space_twice_fails_naming_the_bytes_needed_and_free() -> None:
    config = with_retention(keep_last=1, daily=0, weekly=0, monthly=0, yearly=0)
    h = heal([day(3), day(4)], [day(1), day(2), day(3)], cursor=day(3))
    h.streamer.full = 2
    outcome, _ = await h.run(config=config)
    assert outcome.problem is not None
    assert outcome.result.outcome.startswith("failed")
    assert str(ESTIMATE) in outcome.problem
    assert str(FREE) in outcome.problem
    assert "zbackup" in outcome.problem
    assert len(h.streams()) == 2
    destroyed = [name for e in h.disk_destroys() for name in e[3:]]
    assert sorted(destroyed) == [day(1).short_name, day(2).short_name]  # nothing else


async def test_out_of_space_with_nothing_to_prune_fails_without_a_retry() -> None:
    config = with_retention(keep_last=5, daily=0, weekly=0, monthly=0, yearly=0)
    h = heal([day(3), day(4)], [day(1), day(2), day(3)], cursor=day(3))
    h.streamer.full = 1
    outcome, _ = await h.run(config=config)
    assert outcome.problem is not None
    assert "out of space" in outcome.problem
    assert str(ESTIMATE) in outcome.problem
    assert str(FREE) in outcome.problem
    assert len(h.streams()) == 1
    assert h.disk_destroys() == []


def test_the_out_of_space_receive_is_classified() -> None:
    stderr = "cannot receive new filesystem stream: out of space\n"
    error = parse.classify_error(("zfs", "receive", "-s", "x/y"), 1, stderr)
    assert isinstance(error, parse.OutOfSpace)
    assert not error.transient


async def test_out_of_space_behind_the_senders_broken_pipe_is_recognised() -> None:
    config = with_retention(keep_last=1, daily=0, weekly=0, monthly=0, yearly=0)
    h = heal([day(3), day(4)], [day(1), day(2), day(3)], cursor=day(3))
    h.streamer.full, h.streamer.full_behind_send = 1, True
    outcome, _ = await h.run(config=config)
    assert outcome.problem is None, outcome
    assert len(h.streams()) == 2


async def test_a_resume_the_servers_gate_refuses_is_aborted_and_replanned_once() -> None:
    """Through the gate, a token whose snapshot is gone is refused before zfs runs."""
    token = make_token(day(2).name, toguid=2, fromguid=1, raw=True)
    h = heal([day(1), day(3)], [day(1)], cursor=day(1), token=token)
    h.streamer.gate = True
    outcome, logs = await h.run(listing=[day(1), day(2), day(3)])
    assert outcome.problem is None, outcome
    assert h.index("stream") < h.index("disk", "receive", "-A", TARGET)
    assert [s.guid for s in h.disk.copies[TARGET]] == [1, 3]
    [warning] = [w for w in warnings(logs) if "aborted" in w]
    assert "the server refused to resume it" in warning
