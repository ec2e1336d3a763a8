"""P5: parse a big server listing and plan every dataset in it, on one core.

10,000 datasets x 100 snapshots (1M rows of ``zfs list -H -p -o
name,guid,createtxg,creation``), parsed by ``zbackupd.zfs.parse.parse_versions``, grouped
by dataset the way a run does (``core.model.group_versions``), then planned with
``core.plan.plan_dataset`` against a disk that holds the 90th snapshot of each dataset.
The goal (issue 16) is ≤ 2 s for parse + plan; there is no baseline tool to compare with
in the same run, so the figure is printed beside the goal. Not a test: it never asserts
on time.

    .venv/bin/python -m benchmarks.bench_plan [--datasets 10000] [--snapshots 100]
"""

from __future__ import annotations

import argparse
import gc
import time

from zbackupd.core.model import DatasetState, Encryption, group_versions
from zbackupd.core.plan import SnapshotFilter, plan_dataset
from zbackupd.zfs.parse import parse_versions

GOAL_SECONDS = 2.0


def listing(datasets: int, snapshots: int) -> str:
    """A ``zfs list -t snapshot,bookmark`` answer, sorted by dataset then createtxg."""
    lines = []
    guid = 10**15
    for d in range(datasets):
        name = f"tank/data/group{d // 100:03d}/dataset{d:05d}"
        for s in range(snapshots):
            guid += 7919
            txg = 1000 + d * snapshots + s
            lines.append(f"{name}@zbackupd_2026{s // 28 + 1:02d}{s % 28 + 1:02d}T000000Z"
                         f"\t{guid}\t{txg}\t{1_760_000_000 + txg}")
        lines.append(f"{name}#zbackupd_offsite-a\t{guid - 7919 * 10}\t{txg - 10}\t0")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=10_000)
    parser.add_argument("--snapshots", type=int, default=100)
    args = parser.parse_args()
    text = listing(args.datasets, args.snapshots)
    gc.collect()

    started = time.perf_counter()
    snapshots, bookmarks = parse_versions(text)
    parsed = time.perf_counter()
    states = group_versions(snapshots, bookmarks)
    grouped = time.perf_counter()
    only_own = SnapshotFilter(own_prefix="zbackupd_")
    incremental = 0
    for state in states.values():
        disk = DatasetState("backup/" + state.name, (state.snapshots[89],))
        plan = plan_dataset(
            server=state, disk=disk, encryption=Encryption.ENCRYPTED,
            cursor=state.bookmarks[0] if state.bookmarks else None, snapshot_filter=only_own,
        )
        incremental += bool(plan.transfers)
    planned = time.perf_counter()
    assert incremental == args.datasets, incremental  # every dataset got a plan to send

    rows = len(snapshots) + len(bookmarks)
    total = planned - started
    print(f"P5  {args.datasets} datasets x {args.snapshots} snapshots = {rows:,} rows")
    print(f"    parse {parsed - started:6.2f} s   group {grouped - parsed:6.2f} s   "
          f"plan {planned - grouped:6.2f} s   total {total:6.2f} s")
    print(f"    goal <= {GOAL_SECONDS:.1f} s: {'met' if total <= GOAL_SECONDS else 'NOT met'} "
          f"(ratio to goal {total / GOAL_SECONDS:.2f})")


if __name__ == "__main__":
    main()
