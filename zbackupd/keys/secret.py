"""Secret buffers and secret files: the few primitives every key-handling module shares.

Secrets live in mutable ``bytearray``s so they can be zeroed when done; immutable
``bytes``/``str`` copies cannot be. ``SecretBytes`` is a ``bytearray`` (it goes straight
into ``Runner.run(stdin_secret=...)``) that never shows its content in ``repr``/``str``,
refuses to be pickled or copied, and zeroes itself on ``wipe()`` or when its ``with``
block ends. Files holding secret-derived data are written atomically (a temp file in
the same directory, fsync, then link/rename, then fsync of the directory) with mode 0600
from the first byte on.

Zeroing in Python is best effort; docs/keys.md says where copies escape.
"""

from __future__ import annotations

import contextlib
import os
import stat
import termios
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self

from zbackupd.errors import PermanentError

#: Longest passphrase line ``read_secret`` accepts; longer input is refused, not cut.
MAX_SECRET_LINE = 1024
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def wipe(buffer: bytearray | memoryview) -> None:
    """Overwrite ``buffer`` with zeros in place (same length, same memory)."""
    view = memoryview(buffer).cast("B")
    view[:] = bytes(len(view))


class WipedOnExit:
    """``with secret: …`` wipes it however the block ends (``wipe()`` is the class's)."""

    __slots__ = ()

    def wipe(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()


class SecretBytes(WipedOnExit, bytearray):
    """A ``bytearray`` holding a secret: redacted ``repr``, no pickling, wiped on exit."""

    def wipe(self) -> None:
        """Zero the content in place. The length stays, so a wiped key is all zeros."""
        wipe(self)

    @property
    def is_wiped(self) -> bool:
        """True when every byte is zero (after ``wipe()``; a fresh all-zero secret too)."""
        return not any(self)

    def __repr__(self) -> str:
        return f"SecretBytes(<{len(self)} bytes redacted>)"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled or copied: that would leak the secret")

    def __copy__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be copied: that would leave an unwiped copy")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("SecretBytes cannot be copied: that would leave an unwiped copy")


class SecretInputError(PermanentError):
    """A passphrase could not be read (too long, not a terminal, read error)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read the passphrase from {source}: {reason}")


def read_secret(fd: int, *, source: str = "stdin", max_len: int = MAX_SECRET_LINE) -> SecretBytes:
    """Read one line from ``fd`` into a ``SecretBytes`` without making ``bytes`` copies.

    Reads until a newline or EOF; the newline (and a preceding ``\\r``) is not part of
    the secret. Whatever was read beyond the newline is zeroed. A line longer than
    ``max_len`` is refused rather than silently truncated.
    """
    buffer = SecretBytes(max_len + 1)
    view = memoryview(buffer)
    filled = 0
    try:
        while filled <= max_len:
            count = os.readv(fd, [view[filled:]])
            if count == 0:
                break
            newline = buffer.find(b"\n", filled, filled + count)
            filled += count
            if newline >= 0:
                filled = newline
                break
        else:
            raise SecretInputError(source, f"longer than {max_len} bytes")
        if filled and buffer[filled - 1] == ord("\r"):
            filled -= 1
        secret = SecretBytes(filled)
        secret[:] = view[:filled]
    except OSError as error:
        raise SecretInputError(source, error.strerror or type(error).__name__) from None
    else:
        return secret
    finally:
        view.release()
        buffer.wipe()


def prompt_secret(prompt: str, *, tty_path: str = "/dev/tty") -> SecretBytes:
    """Ask for a passphrase on the controlling terminal with echo off."""
    try:
        fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise SecretInputError(tty_path, error.strerror or "cannot open") from None
    try:
        try:
            saved = termios.tcgetattr(fd)
        except termios.error:
            raise SecretInputError(tty_path, "not a terminal") from None
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO  # lflag: no echo, canonical line editing stays on
        os.write(fd, prompt.encode("utf-8"))
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        try:
            return read_secret(fd, source=tty_path)
        finally:
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
            os.write(fd, b"\n")
    finally:
        os.close(fd)


class FileExistsRefused(PermanentError):
    """A secret file (or key directory) already exists and zbackupd will not replace it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} already exists; refusing to overwrite it")


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700 if missing; tighten an existing one to 0700."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)


def write_file_atomically(
    path: Path, data: bytes | bytearray, *, mode: int = PRIVATE_FILE_MODE, overwrite: bool = False
) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one.

    A temp file in the same directory is created with ``mode`` (never wider for a moment),
    written, fsynced, then linked to ``path`` (``overwrite=False``: fails if ``path``
    exists, atomically) or renamed over it; the directory is fsynced last so the name
    survives a power cut.
    """
    directory = path.parent
    temp = directory / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never wider than asked
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temp, path)
        else:
            try:
                os.link(temp, path)
            except FileExistsError:
                raise FileExistsRefused(path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make a rename/link in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
