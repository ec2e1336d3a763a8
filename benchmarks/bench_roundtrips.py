"""Issue 16: how many server round trips a run costs, and what that means at a latency.

Drives the real session code (``Session._back_up_source``: ``SourceRun`` and every
``DatasetReplication``) against the scripted in-memory server of
``tests/unit/roundtrip_server.py``, which counts every remote command (each ``zfs send``
stream included) and never sleeps. The modelled time is commands x ``--latency`` (50 ms
by default: a LAN SSH exec; through the gate in a slow VM it was ~200 ms), the local
``zfs`` calls on the disk are counted apart. Three runs per size:

- full: the first run, every dataset new;
- idle: the next run with nothing written on the server;
- small change: one dataset written, the rest idle.

Not a test: it never asserts on time.

    .venv/bin/python -m benchmarks.bench_roundtrips [--datasets 40 200] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import collections

import structlog

from tests.unit.roundtrip_server import RoundTripWorld


async def measure(datasets: int) -> list[tuple[str, list[tuple[str, ...]], int]]:
    world = RoundTripWorld.build(datasets)
    rows = []
    for label, change in (("full", False), ("idle", False), ("small change", True)):
        if change:
            world.write("tank/data/ds00000")
        local_before = world.disk.calls
        commands, _ = await world.back_up()
        rows.append((label, commands, world.disk.calls - local_before))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, nargs="+", default=[40, 200])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per command")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    print(f"modelled latency {args.latency * 1000:.0f} ms per server command")
    print(f"{'datasets':>8} {'run':<13} {'server cmds':>11} {'per dataset':>11} "
          f"{'modelled s':>10} {'local zfs':>9}  by verb")
    for datasets in args.datasets:
        for label, commands, local in asyncio.run(measure(datasets)):
            verbs = collections.Counter(
                "estimate" if "-nvP" in c else c[1] for c in commands
            )
            by_verb = " ".join(f"{verb}={n}" for verb, n in sorted(verbs.items()))
            print(f"{datasets:>8} {label:<13} {len(commands):>11} "
                  f"{len(commands) / datasets:>11.2f} {len(commands) * args.latency:>10.1f} "
                  f"{local:>9}  {by_verb}")


if __name__ == "__main__":
    main()
