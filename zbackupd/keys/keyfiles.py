"""The key store on disk: the salt and ``params.json``, their format, modes and errors.

The directory (0700) holds ``salt`` (32 random bytes) and ``params.json`` (the Argon2id cost
parameters and the verifier), both 0600. Nothing here is a key: this module only writes,
reads and checks those files; ``derivation.py`` turns them and a passphrase into keys.
See docs/keys.md.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from zbackupd.errors import PermanentError

# Changing any of these makes every existing key store unreadable: bump FORMAT_VERSION
# (and keep reading the old format) instead.

#: Version of the key-store files and of the derivation labels (``derivation.py``).
FORMAT_VERSION = 1
SALT_BYTES = 32
VERIFIER_BYTES = 32

SALT_FILE = "salt"
PARAMS_FILE = "params.json"

# Bounds accepted when loading params: enough to refuse a corrupted or absurd file.
MIN_LANES, MAX_LANES = 1, 64
MIN_ITERATIONS, MAX_ITERATIONS = 1, 1000
MAX_MEMORY_KIB = 16 * 1024 * 1024  # 16 GiB


# ----------------------------------------------------------------------------- errors


class KeyStoreError(PermanentError):
    """Something is wrong with the key store directory; a human has to look."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"key store {path}: {reason}")


class KeyStoreMissing(KeyStoreError):
    """No key store yet: ``zbackupd keysetup`` has not been run on this machine."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "not set up (run `zbackupd keysetup`)")


class KeyStoreExists(KeyStoreError):
    """``create`` refuses to replace an existing key store: that would orphan every disk."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            path, "exists already; every disk depends on it, so it is never overwritten"
        )


class KeyStoreCorrupt(KeyStoreError):
    """A key store file is unreadable or holds values outside the accepted bounds."""


class KeyStoreInsecure(KeyStoreError):
    """The salt or its directory is accessible to others than its owner."""

    def __init__(self, path: Path, mode: int, wanted: int) -> None:
        self.mode = mode
        self.wanted = wanted
        super().__init__(
            path, f"mode {mode:04o} lets others read it (want {wanted:04o}); fix and retry"
        )


# ------------------------------------------------------------------------ parameters


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost parameters, stored beside the salt (they are not secret)."""

    memory_cost_kib: int
    iterations: int
    lanes: int

    def __post_init__(self) -> None:
        if not MIN_LANES <= self.lanes <= MAX_LANES:
            raise ValueError(f"lanes must be in [{MIN_LANES}, {MAX_LANES}], got {self.lanes}")
        if not MIN_ITERATIONS <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(
                f"iterations must be in [{MIN_ITERATIONS}, {MAX_ITERATIONS}], got {self.iterations}"
            )
        if not 8 * self.lanes <= self.memory_cost_kib <= MAX_MEMORY_KIB:
            raise ValueError(
                f"memory_cost_kib must be in [8*lanes, {MAX_MEMORY_KIB}],"
                f" got {self.memory_cost_kib}"
            )


#: A sane starting point (RFC 9106's second recommendation, more memory); ``calibrate``
#: then tunes the iterations to about a second on this machine.
DEFAULT_PARAMS = KdfParams(memory_cost_kib=256 * 1024, iterations=3, lanes=4)


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """What the key store holds on disk: salt, KDF parameters, verifier. No key."""

    salt: bytes = field(repr=False)
    params: KdfParams
    verifier: bytes = field(repr=False)


# ------------------------------------------------------------------------------ files


def write_new_private_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def require_private(path: Path, wanted: int) -> None:
    mode = stat.S_IMODE(path.lstat().st_mode)
    if mode & 0o077:
        raise KeyStoreInsecure(path, mode, wanted)


def encode_params(params: KdfParams, verifier: bytes) -> str:
    document = {
        "format": FORMAT_VERSION,
        "kdf": "argon2id",
        "memory_cost_kib": params.memory_cost_kib,
        "iterations": params.iterations,
        "lanes": params.lanes,
        "salt_bytes": SALT_BYTES,
        "verifier": verifier.hex(),
    }
    return json.dumps(document, indent=2) + "\n"


def decode_params(path: Path) -> tuple[KdfParams, bytes]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KeyStoreCorrupt(path, f"unreadable: {error}") from None
    if not isinstance(document, dict):
        raise KeyStoreCorrupt(path, "not a JSON object")
    if document.get("format") != FORMAT_VERSION:
        raise KeyStoreCorrupt(path, f"unsupported format {document.get('format')!r}")
    if document.get("kdf") != "argon2id":
        raise KeyStoreCorrupt(path, f"unsupported kdf {document.get('kdf')!r}")
    numbers = {}
    for name in ("memory_cost_kib", "iterations", "lanes"):
        value = document.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise KeyStoreCorrupt(path, f"{name} must be an integer")
        numbers[name] = value
    try:
        params = KdfParams(**numbers)
        verifier = bytes.fromhex(str(document.get("verifier", "")))
    except ValueError as error:
        raise KeyStoreCorrupt(path, str(error)) from None
    if len(verifier) != VERIFIER_BYTES:
        raise KeyStoreCorrupt(path, f"verifier must be {VERIFIER_BYTES} bytes")
    return params, verifier
