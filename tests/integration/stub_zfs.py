"""A stand-in ``zfs`` for the gate's sshd tests: records its argv, answers like zfs would.

``install_stub_zfs(directory)`` writes an executable ``zfs`` whose record file path is
baked in (the gate runs zfs with a scrubbed environment, so nothing can come through it).
The stub answers ``list``/``holds`` with canned ``-H -p`` rows for the names it was given,
``send -nvP`` with a size line, ``send`` with ``SEND_SIZE`` bytes derived from its argv, the
gate's own lookups (``get`` of ``encryption``/``guid``, ``list -o guid``) from ``guid_of`` and
the datasets it was told are encrypted, and everything else with silence and exit 0: it
models argv handling, not ZFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEND_SIZE = 8 * 1024 * 1024
_CHUNK = 256 * 1024
_REPO = Path(__file__).resolve().parents[2]


def guid_of(name: str) -> int:
    """A stable fake guid per name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def send_payload(argv: Sequence[str]) -> bytes:
    """The exact bytes the stub sends for ``argv`` (tests compare digests)."""
    rng = random.Random(" ".join(argv))  # noqa: S311 -- test payload, not a secret
    return rng.randbytes(SEND_SIZE)


def _encryption(dataset: str, encrypted: Sequence[str]) -> str:
    return "aes-256-gcm" if dataset in encrypted else "off"


def _listing(argv: Sequence[str], encrypted: Sequence[str]) -> str:
    datasets = [word for word in argv if "/" in word and not word.startswith("-")]
    if "filesystem,volume" in argv:
        return "".join(
            f"{ds}\tfilesystem\t{guid_of(ds)}\t{_encryption(ds, encrypted)}"
            f"\t{ds if ds in encrypted else '-'}\t4096\n"
            for ds in datasets
        )
    if argv[:4] == ["list", "-H", "-p", "-o"] and argv[4] == "guid":
        (ds,) = datasets
        names = (f"{ds}@zbackupd_20250101T000000Z", f"{ds}#zbackupd_disk1")
        return "".join(f"{guid_of(name)}\n" for name in names)
    rows = []
    for txg, ds in enumerate(datasets, start=100):
        snapshot = f"{ds}@zbackupd_20250101T000000Z"
        rows.append(f"{snapshot}\t{guid_of(snapshot)}\t{txg}\t1735689600\n")
        if "snapshot" not in argv:
            bookmark = f"{ds}#zbackupd_disk1"
            rows.append(f"{bookmark}\t{guid_of(snapshot)}\t{txg}\t1735689600\n")
    return "".join(rows)


def main(record: str, argv: Sequence[str], encrypted: Sequence[str] = ()) -> int:
    """Behave like ``zfs argv[1:]`` as far as the tests need; record ``argv`` first.
    ``encrypted``: the datasets whose ``encryption`` is not ``off``."""
    with open(record, "a", encoding="utf-8") as file:
        file.write(json.dumps({"argv": list(argv), "env": dict(os.environ)}) + "\n")
    words = list(argv[1:])
    out = sys.stdout.buffer
    if words[:1] == ["list"]:
        out.write(_listing(words, encrypted).encode())
    elif words[:5] == ["get", "-H", "-o", "value", "encryption"]:
        out.write(f"{_encryption(words[5], encrypted)}\n".encode())
    elif words[:6] == ["get", "-H", "-p", "-o", "value", "guid"]:
        out.write(f"{guid_of(words[6])}\n".encode())
    elif words[:1] == ["holds"]:
        out.write("".join(f"{s}\tzbackupd_disk1\t1735689600\n" for s in words[3:]).encode())
    elif words[:2] == ["send", "-nvP"]:
        out.write(f"full\t{words[-1]}\t{SEND_SIZE}\nsize\t{SEND_SIZE}\n".encode())
    elif words[:1] == ["send"]:
        payload = send_payload(argv)
        for start in range(0, len(payload), _CHUNK):
            out.write(payload[start : start + _CHUNK])
    out.flush()
    return 0


@dataclass(frozen=True)
class StubZfs:
    """An installed stub: where it is and what it recorded."""

    path: Path
    record: Path

    def calls(self) -> list[tuple[str, ...]]:
        """Every argv the stub was run with, in order."""
        return [tuple(entry["argv"]) for entry in self._entries()]

    def environments(self) -> list[dict[str, str]]:
        """The environment of each run."""
        return [entry["env"] for entry in self._entries()]

    def _entries(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


def install_stub_zfs(directory: Path, *, encrypted: Sequence[str] = ()) -> StubZfs:
    """Write an executable ``directory/zfs`` running ``main`` with this interpreter;
    ``encrypted`` names the datasets it reports as encrypted."""
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / "zfs-calls.jsonl"
    path = directory / "zfs"
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(_REPO)!r})\n"
        "from tests.integration.stub_zfs import main\n"
        f"sys.exit(main({str(record)!r}, sys.argv, {tuple(encrypted)!r}))\n"
    )
    path.chmod(0o755)
    return StubZfs(path, record)
