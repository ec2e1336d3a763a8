"""What the gate costs per command (issue 16, P2g: at most 1.2x a plain shell).

Two real OpenSSH sshds on loopback, both answering with the stub zfs of
``tests/integration/stub_zfs.py``: one forces ``zbackupd-gate`` (``restrict,command=…``,
as docs/server-setup.md installs it), the other has no forced command, so sshd runs the
client's line with the login shell and finds the stub through ``SetEnv PATH``. The same
``zfs list …`` (what the daemon asks first on every run) is timed N times on each:

- ``channel``: one SSH connection, N commands on it (what the daemon does: asyncssh,
  one session channel per command);
- ``connection``: a fresh OpenSSH client per command (handshake included).

Prints median and minimum milliseconds of each and the ratio gate/baseline. Not a test:
absolute numbers depend on the machine, and nothing here asserts on time.

    .venv/bin/python -m benchmarks.bench_gate [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.integration.sshd import OpenSshServer, run_openssh_server
from tests.integration.stub_zfs import install_stub_zfs
from zbackupd.server.remote import connect
from zbackupd.zfs import argv as zargv

ROOT = "tank/data"
COMMAND = zargv.list_snapshots_and_bookmarks([ROOT], recursive=True)


def gate_program() -> Path:
    """The installed console script of this venv, as an admin would name it."""
    script = Path(sys.executable).with_name("zbackupd-gate")
    if not script.exists():
        raise SystemExit(f"{script} missing: install the package (make venv)")
    return script


async def time_channels(server: OpenSshServer, runs: int) -> list[float]:
    """Seconds per command, all on one connection."""
    async with await connect(server.target(), server.client_key) as remote:
        await remote.run(COMMAND)  # warm up: first exec pays for page cache and such
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            result = await remote.run(COMMAND)
            timings.append(time.perf_counter() - started)
            assert ROOT in result.text, result.text
    return timings


def time_connections(server: OpenSshServer, runs: int) -> list[float]:
    """Seconds per command, each with its own OpenSSH client and connection."""
    argv = server.ssh_argv(*COMMAND)
    timings = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        completed = subprocess.run(argv, capture_output=True, text=True, check=False)
        timings.append(time.perf_counter() - started)
        if completed.returncode != 0 or ROOT not in completed.stdout:
            raise SystemExit(f"{argv!r} failed ({completed.returncode}): {completed.stderr}")
    return timings[1:]  # the first one warms up


def row(name: str, baseline: Sequence[float], gated: Sequence[float]) -> str:
    base_ms, gate_ms = statistics.median(baseline) * 1000, statistics.median(gated) * 1000
    return (
        f"{name:<11} {base_ms:>9.1f} {min(baseline) * 1000:>9.1f} "
        f"{gate_ms:>9.1f} {min(gated) * 1000:>9.1f} {gate_ms / base_ms:>7.2f}"
    )


def measure(runs: int, directory: Path, out: Callable[[str], object]) -> None:
    zfs = install_stub_zfs(directory / "bin")
    config = directory / "gate.toml"
    config.write_text(f'roots = ["{ROOT}"]\nzfs = "{zfs.path}"\n')
    forced = f'restrict,command="{gate_program()} --config {config}"'
    plain_path = f"SetEnv PATH={zfs.path.parent}:/usr/bin:/bin"
    with (
        run_openssh_server(directory / "gated", authorized_key_options=forced) as gated,
        run_openssh_server(directory / "plain", extra_config=[plain_path]) as plain,
    ):
        channel = (
            asyncio.run(time_channels(plain, runs)),
            asyncio.run(time_channels(gated, runs)),
        )
        connection = time_connections(plain, runs), time_connections(gated, runs)
    calls = zfs.calls()
    assert all(call[1:] == COMMAND[1:] for call in calls), calls
    out(f"{runs} runs of: {' '.join(COMMAND)}\n")
    out(f"{'':<11} {'baseline':>9} {'(min)':>9} {'gate':>9} {'(min)':>9} {'ratio':>7}\n")
    out(f"{'':<11} {'ms median':>9} {'ms':>9} {'ms median':>9} {'ms':>9} {'median':>7}\n")
    out(row("channel", *channel) + "\n")
    out(row("connection", *connection) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure(args.runs, Path(tmp), sys.stdout.write)


if __name__ == "__main__":
    main()
