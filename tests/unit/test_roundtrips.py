"""Issue 16: what a run costs in server round trips. Nothing changed → nothing sent and a
constant number of server commands whatever the number of datasets; a changed dataset
costs its few commands, no more.

The real session code (``Session._back_up_source``, ``SourceRun``, ``DatasetReplication``)
runs against ``roundtrip_server``'s scripted server, which counts every remote command.
"""

from __future__ import annotations

import pytest
from roundtrip_server import RoundTripWorld

from zbackupd.core.model import Snapshot

#: The server commands one changed dataset may cost in a run (send, hold, bookmark, old
#: cursor destroyed, release; the clean-up: list, holds, destroy).
PER_CHANGED_DATASET = 8


def snapshots_taken(commands: list[tuple[str, ...]]) -> list[str]:
    return [name for c in commands if c[1] == "snapshot" for name in c[2:]]


def sends(commands: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [c for c in commands if c[1] == "send" and "-nvP" not in c]


@pytest.mark.parametrize("datasets", [5, 40])
async def test_an_idle_source_costs_a_constant_number_of_server_commands(datasets: int) -> None:
    world = RoundTripWorld.build(datasets)
    await world.back_up()
    commands, run = await world.back_up()
    assert len(commands) <= 3, [c[:3] for c in commands]
    assert not snapshots_taken(commands)
    assert not sends(commands)
    outcomes = {r.outcome for r in run._tally.results}
    assert outcomes == {"up to date"}
    assert len(run._tally.results) == datasets


async def test_a_small_change_costs_only_the_changed_datasets_commands() -> None:
    world = RoundTripWorld.build(40)
    await world.back_up()
    await world.back_up()
    world.write("tank/data/ds00007")
    commands, _ = await world.back_up()
    assert snapshots_taken(commands) == ["tank/data/ds00007@zbackupd_20260105T030000Z"]
    assert [c[-1] for c in sends(commands)] == snapshots_taken(commands)
    assert len(commands) <= 4 + PER_CHANGED_DATASET, commands


async def test_idle_but_not_yet_on_this_disk_is_sent_without_a_new_snapshot() -> None:
    """offsite-a took and received the run snapshots; nothing was written since. For
    offsite-b the newest snapshot is still to be sent: no new snapshot, a full send each."""
    world = RoundTripWorld.build(5)
    await world.back_up("offsite-a")
    newest = {s.dataset: s.name for s in world.server.snapshots}
    commands, run = await world.back_up("offsite-b")
    assert not snapshots_taken(commands)
    assert sorted(c[-1] for c in sends(commands)) == sorted(newest.values())
    assert {r.outcome for r in run._tally.results} == {"sent"}


async def test_a_dataset_without_a_snapshot_is_snapshotted_even_unwritten() -> None:
    world = RoundTripWorld.build(3)
    for dataset in world.server.datasets.values():
        dataset.written = 0
    commands, _ = await world.back_up()
    assert len(snapshots_taken(commands)) == 3
    assert len(sends(commands)) == 3


async def test_an_unwritten_dataset_whose_newest_snapshot_is_not_ours_is_snapshotted() -> None:
    """The newest is sanoid's: not a send target in create mode, so a run snapshot is."""
    world = RoundTripWorld.build(2)
    await world.back_up()
    world.server.take("tank/data/ds00000@autosnap_2026-01-05_daily")
    commands, _ = await world.back_up()
    assert snapshots_taken(commands) == ["tank/data/ds00000@zbackupd_20260105T020000Z"]
    assert [c[-1] for c in sends(commands)] == snapshots_taken(commands)


async def test_a_written_dataset_gets_its_run_snapshot_and_the_idle_ones_none() -> None:
    world = RoundTripWorld.build(4)
    await world.back_up()
    world.write("tank/data", "tank/data/ds00002")
    commands, _ = await world.back_up()
    assert snapshots_taken(commands) == ["tank/data@zbackupd_20260105T020000Z",
                                         "tank/data/ds00002@zbackupd_20260105T020000Z"]


async def test_a_one_interval_increment_takes_its_size_from_the_listing() -> None:
    """The run snapshot follows the disk's newest directly: the listing's ``written`` is
    the increment's size, and ``zfs send -nvP`` is not asked."""
    world = RoundTripWorld.build(3)
    commands, _ = await world.back_up()
    assert not [c for c in commands if "-nvP" in c]
    world.write("tank/data/ds00001")
    commands, _ = await world.back_up()
    assert not [c for c in commands if "-nvP" in c]


async def test_a_longer_increment_is_still_estimated() -> None:
    """The disk is two snapshots behind: ``written`` covers only the last interval."""
    world = RoundTripWorld.build(2)
    await world.back_up()
    world.server.take("tank/data/ds00000@zbackupd_20260105T013000Z")
    world.write("tank/data/ds00000")
    commands, _ = await world.back_up()
    estimates = [c for c in commands if "-nvP" in c]
    assert [c[-1] for c in estimates] == ["tank/data/ds00000@zbackupd_20260105T020000Z"]


async def test_the_reused_newest_snapshot_is_protected_from_concurrent_prunes() -> None:
    world = RoundTripWorld.build(2)
    await world.back_up("offsite-a")
    run = world.session("offsite-b")
    work = run.source_run(run.config.sources[0], world.server)  # type: ignore[arg-type]
    await work.take_snapshots()
    newest = [s.name for s in world.server.snapshots]
    assert world.registry.in_use(newest) == set(newest)
    assert all(isinstance(s, Snapshot) for s in world.server.snapshots)
