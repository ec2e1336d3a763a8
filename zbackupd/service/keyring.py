"""The daemon's unlocked keys, only in memory: the master key (each disk's pool key is
derived from it when needed) and the decrypted SSH client key. Wiped on stop.

An unlock derives the master key off the loop (Argon2id), then decrypts the SSH key; one
that finishes while the daemon stops is dropped (``DaemonStopping``), so a stop never
leaves a key behind however the two interleave.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncssh

from zbackupd.errors import PermanentError, TransientError, ZbackupdError
from zbackupd.keys.derivation import KeyStore, MasterKey
from zbackupd.keys.secret import SecretBytes, read_secret
from zbackupd.keys.sshkey import load_identity

#: The systemd credential (``LoadCredentialEncrypted=``) holding the passphrase.
CREDENTIAL_NAME = "zbackupd-passphrase"


class AlreadyUnlocked(PermanentError):
    def __init__(self) -> None:
        super().__init__("already unlocked")


class DaemonStopping(TransientError):
    """An unlock that arrives, or finishes, while the daemon stops: its key is not kept."""

    def __init__(self) -> None:
        super().__init__("the daemon is stopping: unlock refused, no key kept")


class Locked(PermanentError):
    def __init__(self, what: str) -> None:
        super().__init__(f"locked: the {what} is not available")


class Keyring:
    def __init__(self, keystore: KeyStore, *, stopping: asyncio.Event) -> None:
        self._keystore = keystore
        self._stopping = stopping
        self._master: MasterKey | None = None
        self._client_key: asyncssh.SSHKey | None = None
        self._lock = asyncio.Lock()

    @property
    def unlocked(self) -> bool:
        return self._master is not None

    async def unlock(self, passphrase: SecretBytes, ssh_key_file: Path) -> None:
        """Derive the master key, decrypt the SSH key; ``WrongPassphrase`` if it is wrong."""
        async with self._lock:
            if self._master is not None:
                raise AlreadyUnlocked
            if self._stopping.is_set():
                raise DaemonStopping
            master = await self._keystore.unlock(passphrase)
            try:
                with master.ssh_passphrase() as ssh_passphrase:
                    client_key = await asyncio.to_thread(load_identity, ssh_key_file,
                                                         ssh_passphrase)
            except ZbackupdError:
                master.wipe()
                raise
            if self._stopping.is_set():  # the stop wiped the keys while we derived this one
                master.wipe()
                raise DaemonStopping
            self._master, self._client_key = master, client_key

    def pool_key(self, label: str) -> bytearray:
        """A fresh copy of disk ``label``'s pool key; the caller wipes it."""
        if self._master is None:
            raise Locked("pool key")
        return self._master.pool_key(label)

    def client_key(self) -> asyncssh.SSHKey:
        if self._client_key is None:
            raise Locked("SSH key")
        return self._client_key

    def wipe(self) -> None:
        if self._master is not None:
            self._master.wipe()
        self._client_key = None


def read_credential() -> tuple[SecretBytes, str] | None:
    """Unattended mode: the passphrase from a systemd credential (maybe TPM2-sealed), with
    where it came from; None when the unit passes no credential."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return read_secret(fd, source=str(path)), str(path)
    finally:
        os.close(fd)
