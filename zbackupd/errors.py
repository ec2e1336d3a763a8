"""Typed errors, each carrying its facts and whether retrying later can help.

Standard library only: the server-side gate imports this module too.
"""

from __future__ import annotations

from collections.abc import Sequence


class ZbackupdError(Exception):
    """Base of every error zbackupd raises on purpose.

    ``transient`` says whether the same operation may succeed later without anyone
    changing anything (a busy pool, a dropped link); permanent errors need a human.
    """

    transient: bool = False


class PermanentError(ZbackupdError):
    """Retrying will not help; the status line must say what the admin has to do."""

    transient = False


class TransientError(ZbackupdError):
    """Retrying later may help (busy pool, network drop, disk pulled)."""

    transient = True


class CommandError(ZbackupdError):
    """A command exited non-zero. Holds the argv, the exit code and its stderr.

    Whether it is transient is decided by whoever classified the stderr (see
    ``zbackupd.zfs.parse.classify_error``); a bare ``CommandError`` is permanent.
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stderr: str,
        *,
        transient: bool = False,
    ) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.transient = transient
        first_line = stderr.strip().splitlines()[0] if stderr.strip() else "(no stderr)"
        super().__init__(f"{self.argv[0]} exited {returncode}: {first_line}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_command_error, (self.argv, self.returncode, self.stderr, self.transient))


def _rebuild_command_error(
    argv: Sequence[str], returncode: int, stderr: str, transient: bool
) -> CommandError:
    return CommandError(argv, returncode, stderr, transient=transient)
