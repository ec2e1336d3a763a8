"""Runs INSIDE the guest: search files, /proc/*/cmdline and /proc/*/environ for secrets.

Searches the trees named in argv (default ``/``, plus /proc's cmdlines and
environs). Reads the secrets as hex lines on stdin (so this script's own argv holds none of them),
prints one line per hit (``where: which``) and a last line ``hits: N``. Standard library
only; files larger than 256 MiB and pseudo file systems are skipped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SKIP_TREES = ("/proc", "/sys", "/dev")
MAX_FILE = 256 << 20
CHUNK = 8 << 20


def file_hits(path: str, needles: list[tuple[str, bytes]]) -> list[str]:
    longest = max(len(needle) for _, needle in needles)
    found: set[str] = set()
    try:
        with open(path, "rb") as handle:
            tail = b""
            while chunk := handle.read(CHUNK):
                window = tail + chunk
                for name, needle in needles:
                    if needle in window:
                        found.add(name)
                tail = window[-longest:]
    except OSError:
        return []
    return sorted(found)


def main() -> int:
    needles = []
    for line in sys.stdin.read().split():
        name, _, value = line.partition("=")
        needles.append((name, bytes.fromhex(value)))
    hits: list[str] = []
    roots = sys.argv[1:] or ["/"]
    for top, dirs, files in (entry for root in roots for entry in os.walk(root)):
        if top.startswith(SKIP_TREES) and top != "/":
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in SKIP_TREES]
        for name in files:
            path = os.path.join(top, name)
            try:
                if not Path(path).is_file() or Path(path).is_symlink():
                    continue
                if os.path.getsize(path) > MAX_FILE:
                    continue
            except OSError:
                continue
            hits.extend(f"{path}: {which}" for which in file_hits(path, needles))
    for pid in os.listdir("/proc") if roots == ["/"] else ():
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            path = f"/proc/{pid}/{part}"
            hits.extend(f"{path}: {which}" for which in file_hits(path, needles))
    for hit in hits:
        print(hit)
    print(f"hits: {len(hits)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
