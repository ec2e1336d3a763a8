"""The daemon's SSH identity: ed25519, private key stored only encrypted, decrypted in memory.

The private key file is OpenSSH's own encrypted format (bcrypt KDF, aes256-ctr), the
passphrase being ``MasterKey.ssh_passphrase()``: without the unlock passphrase *and* the
installation salt the file is useless. The public key sits beside it (``<path>.pub``).
The server accepts the key only with ``restrict`` and the forced ``zbackupd-gate``
command, which ``authorized_keys_line`` formats.
"""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path
from typing import Final

import asyncssh

from zbackupd.errors import PermanentError
from zbackupd.keys.secret import ensure_private_dir, write_file_atomically

#: bcrypt-pbkdf rounds for the private key file. The passphrase is 256 random bits from
#: HKDF, so rounds add no security against guessing it; 50 is the least the bcrypt
#: package accepts without a "not secure" warning (about 0.4 s here, each way).
DEFAULT_ROUNDS: Final = 50
PRIVATE_KEY_CIPHER: Final = "aes256-ctr"
KEY_TYPE: Final = "ssh-ed25519"
#: The forced command as docs/server-setup.md installs it (a venv without dependencies):
#: always a full path, never a name for the account's shell to look up in its PATH.
DEFAULT_GATE_COMMAND: Final = (
    "/opt/zbackupd-gate/bin/zbackupd-gate --config /etc/zbackupd/gate.toml"
)
_FORBIDDEN_IN_OPTIONS: Final = frozenset('"\\\n\r\0')


class IdentityError(PermanentError):
    """Something is wrong with the SSH identity files; a human has to look."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"SSH identity {path}: {reason}")


class IdentityExists(IdentityError):
    """``generate_identity`` refuses to replace a key the server may already trust."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "exists already; refusing to overwrite it")


class IdentityMissing(IdentityError):
    """No identity yet: ``zbackupd keygen`` has not been run."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "does not exist (run `zbackupd keygen`)")


class IdentityUnreadable(IdentityError):
    """The private key could not be decrypted: wrong passphrase or a damaged file."""


class InvalidAuthorizedKeysInput(PermanentError):
    """A value for the ``authorized_keys`` line would break out of its quotes or line, or
    the gate command does not name its program by absolute path."""

    def __init__(
        self,
        what: str,
        value: str,
        reason: str = "must not contain quotes, backslashes or newlines",
    ) -> None:
        self.what = what
        self.value = value
        self.reason = reason
        super().__init__(f"{what} {value!r} {reason}")


def public_key_path(private_key_path: Path) -> Path:
    """Where the public key lives: beside the private key, with ``.pub`` appended."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def default_comment() -> str:
    return f"zbackupd@{socket.gethostname()}"


def generate_identity(
    path: Path,
    passphrase: bytearray,
    *,
    comment: str | None = None,
    rounds: int = DEFAULT_ROUNDS,
) -> asyncssh.SSHKey:
    """Make a new ed25519 identity; write it encrypted (0600) and its public key (0644).

    Returns the public key. Refuses to overwrite either file. The unencrypted private
    key never leaves memory.
    """
    comment = comment or default_comment()
    if any(char in "\n\r\0" for char in comment):
        raise InvalidAuthorizedKeysInput("key comment", comment)
    pub_path = public_key_path(path)
    for existing in (path, pub_path):
        if existing.exists() or existing.is_symlink():
            raise IdentityExists(existing)
    ensure_private_dir(path.parent)
    key = asyncssh.generate_private_key(KEY_TYPE, comment=comment)
    encrypted = key.export_private_key(
        "openssh",
        # asyncssh/bcrypt accept only bytes: this immutable copy is unavoidable.
        passphrase=bytes(passphrase),
        cipher_name=PRIVATE_KEY_CIPHER,
        rounds=rounds,
    )
    public = key.convert_to_public()
    write_file_atomically(path, encrypted, mode=0o600)
    write_file_atomically(pub_path, public.export_public_key("openssh"), mode=0o644)
    return public


def load_identity(path: Path, passphrase: bytearray) -> asyncssh.SSHKey:
    """Decrypt the private key in memory. ``IdentityUnreadable`` on a wrong passphrase."""
    data = _read_private_key_file(path)
    try:
        # asyncssh/bcrypt accept only bytes: this immutable copy is unavoidable.
        return asyncssh.import_private_key(data, bytes(passphrase))
    except (asyncssh.KeyImportError, ValueError) as error:
        # asyncssh's messages name the failure ("Incorrect passphrase"), never the key.
        raise IdentityUnreadable(path, f"cannot decrypt: {error}") from None


async def load_identity_async(path: Path, passphrase: bytearray) -> asyncssh.SSHKey:
    """``load_identity`` off the event loop: bcrypt-pbkdf takes a good fraction of a second."""
    return await asyncio.to_thread(load_identity, path, passphrase)


def load_public_key(path: Path) -> asyncssh.SSHKey:
    """The public key beside ``path`` (no passphrase needed), e.g. to print it again."""
    pub_path = public_key_path(path)
    try:
        return asyncssh.read_public_key(pub_path)
    except FileNotFoundError:
        raise IdentityMissing(pub_path) from None
    except (OSError, asyncssh.KeyImportError, ValueError) as error:
        raise IdentityUnreadable(pub_path, str(error)) from None


def _read_private_key_file(path: Path) -> bytes:
    try:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            raise IdentityError(path, f"mode {mode:04o} lets others read it (want 0600)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityMissing(path) from None
    except OSError as error:
        raise IdentityUnreadable(path, error.strerror or type(error).__name__) from None
    _require_encrypted(path, data)
    return data


def _require_encrypted(path: Path, data: bytes) -> None:
    """Refuse a private key stored without encryption: that must never happen.

    Cheap: without a passphrase asyncssh stops before any KDF on an encrypted key.
    """
    try:
        asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError):
        return  # it needs a passphrase: encrypted, as it must be
    raise IdentityError(path, "the private key is stored unencrypted; replace it")


def authorized_keys_line(
    public_key: asyncssh.SSHKey,
    gate_command: str = DEFAULT_GATE_COMMAND,
    from_: str | None = None,
) -> str:
    """The line for the server's ``authorized_keys``: restricted, forced command, no newline.

    ``restrict`` turns off forwarding, pty and user rc; ``command=`` forces the gate
    whatever the client asks; ``from=`` (optional) pins the client's address pattern.
    """
    _check_option_value("gate command", gate_command)
    if not gate_command.startswith("/"):
        raise InvalidAuthorizedKeysInput(
            "gate command", gate_command, "must start with the gate's absolute path"
        )
    options = ["restrict"]
    if from_ is not None:
        _check_option_value("from pattern", from_)
        options.append(f'from="{from_}"')
    options.append(f'command="{gate_command}"')
    key_text = public_key.export_public_key("openssh").decode("ascii").strip()
    if "\n" in key_text or "\r" in key_text:
        raise InvalidAuthorizedKeysInput("public key", key_text)
    return f"{','.join(options)} {key_text}"


def _check_option_value(what: str, value: str) -> None:
    if not value or any(char in _FORBIDDEN_IN_OPTIONS for char in value):
        raise InvalidAuthorizedKeysInput(what, value)
