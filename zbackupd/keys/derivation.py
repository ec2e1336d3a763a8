"""Passphrase + per-installation salt → Argon2id master key → HKDF → independent keys.

The passphrase is only a second factor: the master key is Argon2id over the passphrase
*and* a 32-byte random salt that exists only on this machine (a root-only file), so a
short passphrase alone gives an attacker nothing. From the master key, HKDF-Expand
(SHA-256) derives, each under its own versioned ``info`` label:

- one 32-byte raw ZFS key per disk (``keyformat=raw``), bound to the disk's label, so a
  stolen disk's key says nothing about the other disks;
- the passphrase of the encrypted SSH private key (64 hex characters);
- a verifier, the only derived value ever stored, to refuse a wrong passphrase before
  any disk is touched.

Nothing derived here is written anywhere except the verifier. See docs/keys.md.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from zbackupd.errors import PermanentError
from zbackupd.keys.keyfiles import (
    DEFAULT_PARAMS,
    PARAMS_FILE,
    SALT_BYTES,
    SALT_FILE,
    VERIFIER_BYTES,
    KdfParams,
    KeyMaterial,
    KeyStoreCorrupt,
    KeyStoreExists,
    KeyStoreMissing,
    decode_params,
    encode_params,
    require_private,
    write_new_private_file,
)
from zbackupd.keys.secret import (
    SecretBytes,
    WipedOnExit,
    ensure_private_dir,
    fsync_directory,
)

# --- The derivation scheme. Changing any of these makes every existing disk unreadable:
# --- bump keyfiles.FORMAT_VERSION and keep the old labels instead.

MASTER_KEY_BYTES = 32
POOL_KEY_BYTES = 32  # what `zfs load-key` wants for keyformat=raw, exactly
SSH_PASSPHRASE_SEED_BYTES = 32
#: Argon2id associated data: binds the master key to this scheme and version.
ARGON2_AD = b"zbackupd/v1/master-key"
INFO_POOL_KEY_PREFIX = b"zbackupd/v1/pool-key/"  # + the disk's label (UTF-8)
INFO_SSH_PASSPHRASE = b"zbackupd/v1/ssh-key-passphrase"
INFO_VERIFIER = b"zbackupd/v1/verifier"

#: A passphrase shorter than this is refused at creation (it is a second factor, but a
#: one-character second factor is not a factor).
MIN_PASSPHRASE_BYTES = 8
MAX_DISK_LABEL_BYTES = 128

_HEX_DIGITS = b"0123456789abcdef"


# ----------------------------------------------------------------------------- errors


class WrongPassphrase(PermanentError):
    """The passphrase does not reproduce this installation's verifier."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        super().__init__(f"wrong passphrase for the key store in {keys_dir}")


class WeakPassphrase(PermanentError):
    """A new key store was asked for with a passphrase that is too short."""

    def __init__(self, length: int, minimum: int) -> None:
        self.length = length
        self.minimum = minimum
        super().__init__(f"passphrase has {length} bytes; at least {minimum} are required")


class InvalidDiskLabel(PermanentError):
    """A disk label cannot be bound into a key (empty, too long, control characters)."""

    def __init__(self, label: str, reason: str) -> None:
        self.label = label
        self.reason = reason
        super().__init__(f"disk label {label!r} cannot name a key: {reason}")


class KeyWiped(PermanentError):
    """A ``MasterKey`` was used after ``wipe()``: a bug in the caller."""

    def __init__(self) -> None:
        super().__init__("the master key was already wiped")


class InvalidRecoveryKey(PermanentError):
    """A typed-in recovery key is not 64 hex digits (the message never echoes it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not a recovery key: {reason}")


# ------------------------------------------------------------------------ derivation


def derive_master_key(passphrase: bytearray, salt: bytes, params: KdfParams) -> MasterKey:
    """Argon2id(passphrase, salt) → ``MasterKey``. Pure and blocking (about a second)."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes, got {len(salt)}")
    kdf = Argon2id(
        salt=salt,
        length=MASTER_KEY_BYTES,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_cost_kib,
        ad=ARGON2_AD,
    )
    key = SecretBytes(MASTER_KEY_BYTES)
    # The binding accepts any buffer at run time; its stub says bytes. Passing the
    # bytearray itself avoids an immutable copy of the passphrase.
    kdf.derive_into(cast(bytes, passphrase), key)
    return MasterKey(key)


def _expand(master: bytearray, info: bytes, length: int) -> SecretBytes:
    out = SecretBytes(length)
    HKDFExpand(hashes.SHA256(), length, info).derive_into(master, out)
    return out


def pool_key_info(disk_label: str) -> bytes:
    """The HKDF ``info`` for one disk's pool key; refuses labels that could be ambiguous."""
    encoded = disk_label.encode("utf-8")
    if not encoded:
        raise InvalidDiskLabel(disk_label, "empty")
    if len(encoded) > MAX_DISK_LABEL_BYTES:
        raise InvalidDiskLabel(disk_label, f"longer than {MAX_DISK_LABEL_BYTES} bytes")
    if not disk_label.isprintable():
        raise InvalidDiskLabel(disk_label, "contains control characters")
    if disk_label != disk_label.strip():
        raise InvalidDiskLabel(disk_label, "leading or trailing whitespace")
    return INFO_POOL_KEY_PREFIX + encoded


class MasterKey(WipedOnExit):
    """The unlocked master key, in memory only. Derives the per-purpose keys.

    Every derived key is a fresh ``SecretBytes`` the caller owns and must wipe (use it
    as a context manager). ``wipe()`` zeroes the master key; using it afterwards raises
    ``KeyWiped``.
    """

    __slots__ = ("_key",)

    def __init__(self, key: SecretBytes) -> None:
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(f"a master key has {MASTER_KEY_BYTES} bytes")
        self._key: SecretBytes | None = key

    def _live(self) -> SecretBytes:
        if self._key is None:
            raise KeyWiped
        return self._key

    def pool_key(self, disk_label: str) -> SecretBytes:
        """The 32 raw bytes for ``zfs load-key -L prompt`` on the disk labelled so."""
        return _expand(self._live(), pool_key_info(disk_label), POOL_KEY_BYTES)

    def ssh_passphrase(self) -> SecretBytes:
        """The SSH private key's passphrase: 64 lowercase hex characters (ASCII).

        Hex, not raw bytes, so ``ssh-keygen -p`` could take it by hand in an emergency.
        """
        with _expand(self._live(), INFO_SSH_PASSPHRASE, SSH_PASSPHRASE_SEED_BYTES) as seed:
            return hex_secret(seed)

    def verifier(self) -> bytes:
        """The value stored to recognise the right passphrase. One-way: not secret."""
        with _expand(self._live(), INFO_VERIFIER, VERIFIER_BYTES) as verifier:
            return bytes(verifier)

    def recovery_key(self, disk_label: str) -> SecretBytes:
        """The disk's pool key as 8 groups of 8 hex digits for printing (see docs/keys.md).

        ``echo '<groups>' | xxd -r -p | zfs load-key -L prompt <pool>`` turns it back into
        the 32 raw bytes on any machine.
        """
        with self.pool_key(disk_label) as key, hex_secret(key) as digits:
            groups = SecretBytes(len(digits) + len(digits) // 8 - 1)
            out = 0
            for index, digit in enumerate(digits):
                if index and index % 8 == 0:
                    groups[out] = ord(" ")
                    out += 1
                groups[out] = digit
                out += 1
            return groups

    @property
    def is_wiped(self) -> bool:
        return self._key is None

    def wipe(self) -> None:
        """Zero the master key. Idempotent."""
        if self._key is not None:
            self._key.wipe()
            self._key = None

    def __repr__(self) -> str:
        return f"MasterKey(<{'wiped' if self._key is None else 'redacted'}>)"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("MasterKey cannot be pickled or copied")


def hex_secret(data: bytearray) -> SecretBytes:
    """Lowercase hex of ``data`` written straight into a ``SecretBytes`` (no str copies)."""
    out = SecretBytes(2 * len(data))
    for index, byte in enumerate(data):
        out[2 * index] = _HEX_DIGITS[byte >> 4]
        out[2 * index + 1] = _HEX_DIGITS[byte & 0x0F]
    return out


def parse_recovery_key(text: bytearray) -> SecretBytes:
    """The 32 raw bytes from a typed recovery key; spaces, dashes and newlines are ignored."""
    nibbles = SecretBytes(2 * POOL_KEY_BYTES)
    count = 0
    try:
        for char in text:
            if char in b" -\t\r\n":
                continue
            value = _HEX_DIGITS.find(char | 0x20)  # | 0x20 lower-cases A-F
            if value < 0:
                raise InvalidRecoveryKey("it contains a character that is not a hex digit")
            if count == len(nibbles):
                raise InvalidRecoveryKey(f"it has more than {len(nibbles)} hex digits")
            nibbles[count] = value
            count += 1
        if count != len(nibbles):
            raise InvalidRecoveryKey(f"it has {count} hex digits, want {len(nibbles)}")
        key = SecretBytes(POOL_KEY_BYTES)
        for index in range(POOL_KEY_BYTES):
            key[index] = nibbles[2 * index] << 4 | nibbles[2 * index + 1]
        return key
    finally:
        nibbles.wipe()


# ------------------------------------------------------------------------ the store


class KeyStore:
    """The key store directory: ``salt`` (32 random bytes) and ``params.json``, both 0600,
    in a 0700 directory owned by root (written and checked by ``keyfiles.py``). Holds no
    key; see the module docstring.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir

    @property
    def salt_path(self) -> Path:
        return self.keys_dir / SALT_FILE

    @property
    def params_path(self) -> Path:
        return self.keys_dir / PARAMS_FILE

    def exists(self) -> bool:
        return self.params_path.exists() or self.salt_path.exists()

    def create(self, passphrase: bytearray, params: KdfParams) -> None:
        """Make a new key store. Refuses if one exists: every disk's key depends on it.

        The whole directory appears at once: both files are written into a private
        temp directory beside it, fsynced, and the directory is renamed into place
        (which fails if a non-empty ``keys_dir`` exists).
        """
        if len(passphrase) < MIN_PASSPHRASE_BYTES:
            raise WeakPassphrase(len(passphrase), MIN_PASSPHRASE_BYTES)
        if self.exists():
            raise KeyStoreExists(self.keys_dir)
        salt = os.urandom(SALT_BYTES)
        with derive_master_key(passphrase, salt, params) as master:
            verifier = master.verifier()
        parent = self.keys_dir.parent
        if not parent.exists():
            ensure_private_dir(parent)
        temp_dir = parent / f".{self.keys_dir.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        temp_dir.mkdir(mode=0o700)
        try:
            temp_dir.chmod(0o700)
            write_new_private_file(temp_dir / SALT_FILE, salt)
            write_new_private_file(
                temp_dir / PARAMS_FILE, encode_params(params, verifier).encode("utf-8")
            )
            fsync_directory(temp_dir)
            try:
                temp_dir.rename(self.keys_dir)
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST):  # someone else was faster
                    raise KeyStoreExists(self.keys_dir) from error
                raise
            fsync_directory(parent)
        finally:
            if temp_dir.exists():
                for leftover in temp_dir.iterdir():
                    leftover.unlink()
                temp_dir.rmdir()

    def load(self) -> KeyMaterial:
        """Read and check salt, params and verifier; refuses loose modes like ssh does."""
        if not self.keys_dir.exists():
            raise KeyStoreMissing(self.keys_dir)
        require_private(self.keys_dir, 0o700)
        if not self.params_path.exists() or not self.salt_path.exists():
            missing = self.params_path if not self.params_path.exists() else self.salt_path
            if not any(self.keys_dir.iterdir()):
                raise KeyStoreMissing(self.keys_dir)
            raise KeyStoreCorrupt(self.keys_dir, f"{missing.name} is missing")
        require_private(self.salt_path, 0o600)
        salt = self.salt_path.read_bytes()
        if len(salt) != SALT_BYTES:
            raise KeyStoreCorrupt(self.salt_path, f"salt has {len(salt)} bytes, want {SALT_BYTES}")
        params, verifier = decode_params(self.params_path)
        return KeyMaterial(salt=salt, params=params, verifier=verifier)

    def unlock_blocking(self, passphrase: bytearray) -> MasterKey:
        """Derive and verify the master key in this thread (CLI use; about a second)."""
        material = self.load()
        return _verified(
            derive_master_key(passphrase, material.salt, material.params),
            material.verifier,
            self.keys_dir,
        )

    async def unlock(self, passphrase: bytearray) -> MasterKey:
        """Derive and verify the master key off the event loop; ``WrongPassphrase`` if not."""
        material = self.load()
        master = await asyncio.to_thread(
            derive_master_key, passphrase, material.salt, material.params
        )
        return _verified(master, material.verifier, self.keys_dir)

    def __repr__(self) -> str:
        return f"KeyStore({str(self.keys_dir)!r})"


def _verified(master: MasterKey, verifier: bytes, keys_dir: Path) -> MasterKey:
    if hmac.compare_digest(master.verifier(), verifier):
        return master
    master.wipe()
    raise WrongPassphrase(keys_dir)


# ------------------------------------------------------------------------ calibration

#: How long one derivation with ``params`` takes, in seconds. The seam tests replace.
Measure = Callable[[KdfParams], float]


def measure_derivation(params: KdfParams) -> float:
    """Time one real Argon2id derivation with a throwaway passphrase and salt."""
    scratch = SecretBytes(b"calibration-only")
    start = time.perf_counter()
    with derive_master_key(scratch, bytes(SALT_BYTES), params):
        pass
    return time.perf_counter() - start


def calibrate(
    target_seconds: float = 1.0,
    *,
    memory_cost_kib: int = DEFAULT_PARAMS.memory_cost_kib,
    min_memory_cost_kib: int = 64 * 1024,
    lanes: int = DEFAULT_PARAMS.lanes,
    max_iterations: int = 64,
    samples: int = 3,
    measure: Measure = measure_derivation,
) -> KdfParams:
    """Pick Argon2id parameters so one derivation takes about ``target_seconds`` here.

    Memory is the main defence (it makes GPU/ASIC guessing expensive), so it starts at
    ``memory_cost_kib`` and is only halved (down to ``min_memory_cost_kib``) while a
    single pass is already slower than the target; then the iterations are scaled
    linearly to the target, at least 1 and at most ``max_iterations``. Each timing is the
    best of ``samples`` runs: the first run pays for faulting in the memory, and other
    processes on the machine only ever make a run slower.
    """
    if target_seconds <= 0:
        raise ValueError("target_seconds must be positive")
    if samples < 1:
        raise ValueError("samples must be at least 1")

    def best_one_pass(memory: int) -> float:
        return min(measure(KdfParams(memory, 1, lanes)) for _ in range(samples))

    memory = memory_cost_kib
    one_pass = best_one_pass(memory)
    while one_pass > target_seconds and memory // 2 >= max(min_memory_cost_kib, 8 * lanes):
        memory //= 2
        one_pass = best_one_pass(memory)
    iterations = int(target_seconds / one_pass) if one_pass > 0 else max_iterations
    iterations = max(1, min(max_iterations, iterations))
    return KdfParams(memory_cost_kib=memory, iterations=iterations, lanes=lanes)
