"""Throughput of the transfer path against the OpenSSH client, same sshd, same run.

Streams SIZE bytes of ``head -c SIZE /dev/zero`` from a real loopback sshd (a) through
``zbackupd.server.transfer.stream`` into a local sink process, as a backup would, and (b) with
``ssh host head -c SIZE /dev/zero > /dev/null``. Prints MiB/s of both and the ratio.
Not a test: absolute numbers depend on the machine; the ratio is what to compare.

    .venv/bin/python -m benchmarks.bench_transfer [--size-mib 1024] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.sshd import OpenSshServer, run_openssh_server
from zbackupd.server.remote import connect
from zbackupd.server.transfer import stream
from zbackupd.zfs.runner import LocalRunner

MiB = 1024 * 1024


async def zbackupd_path(server: OpenSshServer, size: int, cipher: str) -> float:
    """Seconds for the asyncssh → os.pipe() → sink path."""
    target = server.target(ciphers=(cipher,))
    async with await connect(target, server.client_key) as remote:
        started = time.perf_counter()
        result = await stream(
            remote,
            ["head", "-c", str(size), "/dev/zero"],
            LocalRunner(),
            ["sh", "-c", "cat > /dev/null"],
        )
        elapsed = time.perf_counter() - started
    assert result.bytes_transferred == size, result.bytes_transferred
    return elapsed


def openssh_client(server: OpenSshServer, size: int, cipher: str) -> float:
    """Seconds for ``ssh host head -c SIZE /dev/zero > /dev/null``."""
    argv = server.ssh_argv("head", "-c", str(size), "/dev/zero")
    argv[argv.index("Ciphers=aes128-gcm@openssh.com")] = f"Ciphers={cipher}"
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com")
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp, run_openssh_server(Path(tmp)) as server:
        for round_number in range(1, args.rounds + 1):
            ours = asyncio.run(zbackupd_path(server, size, args.cipher))
            theirs = openssh_client(server, size, args.cipher)
            ours_rate, theirs_rate = args.size_mib / ours, args.size_mib / theirs
            print(
                f"round {round_number}: {args.size_mib} MiB, {args.cipher}: "
                f"zbackupd transfer {ours_rate:.0f} MiB/s, "
                f"OpenSSH client {theirs_rate:.0f} MiB/s, "
                f"ratio {ours_rate / theirs_rate:.2f}"
            )


if __name__ == "__main__":
    main()
