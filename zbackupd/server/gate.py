"""``zbackupd-gate``: the SSH forced command on the backup server.

sshd runs it instead of whatever the client asked for, with the client's command line in
``SSH_ORIGINAL_COMMAND``. The gate splits that line with ``shlex.split`` (no shell ever
sees it), accepts it only if it fits the one remote grammar in
``zbackupd.zfs.argv.REMOTE_SHAPES`` within the configured dataset roots, and then
``exec``s zfs with exactly that argv. Everything else is refused: a one-line reason on
stderr, a line in syslog/journal, a non-zero exit.

Standard library only: it runs on a server that may have nothing but ``python3``. It
imports ``zbackupd.errors``, ``zbackupd.zfs.names`` and ``zbackupd.zfs.argv`` (and
``zbackupd.core.values``, which argv uses), never the daemon's dependencies.
"""

from __future__ import annotations

import os
import sys
import syslog
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from zbackupd.core.values import Record
from zbackupd.errors import PermanentError
from zbackupd.server.gate_config import (
    DEFAULT_CONFIG_PATH,
    EXIT_BAD_CONFIG,
    EXIT_NO_ZFS,
    EXIT_REFUSED,
    LOG_COMMAND_LIMIT,
    SAFE_PATH,
    SYSLOG_IDENT,
    GateConfig,
    GateConfigError,
    load_config,
)
from zbackupd.zfs import names
from zbackupd.zfs.argv import (
    InvalidArgument,
    Refusal,
    RemoteCommand,
    RemoteKind,
    ResumeTokenContents,
    decode_resume_token,
    match_remote_argv,
    send_is_raw,
)

# -- the decision (pure but for the injected lookups) ----------------------------------


class LookupFailed(PermanentError):
    """One of the gate's own zfs queries failed: the command it was checking is refused."""

    def __init__(self, argv: Sequence[str], reason: str) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.reason = reason
        super().__init__(f"{' '.join(self.argv[1:3])} failed: {reason}")


#: Runs one of the gate's own zfs queries (argv, zfs first) and returns its stdout;
#: raises ``LookupFailed``. Injected: tests pass a fake, the gate ``run_lookup``.
Lookup = Callable[[tuple[str, ...]], str]


class Accepted(Record):
    """The command may run: exactly ``command.argv``, with zfs from the configuration."""

    __slots__ = ("command",)
    command: RemoteCommand

    def __init__(self, command: RemoteCommand) -> None:
        self._init(command=command)


class Refused(Record):
    """The command must not run. ``reason`` goes to the client's stderr and the log."""

    __slots__ = ("argv", "reason")
    reason: str
    argv: tuple[str, ...] | None

    def __init__(self, reason: str, argv: tuple[str, ...] | None = None) -> None:
        self._init(reason=reason, argv=argv)


Decision = Accepted | Refused


def decide(original_command: str | None, config: GateConfig, lookup: Lookup) -> Decision:
    """Accept ``original_command`` only if it is one of zbackupd's own zfs commands.

    ``lookup`` runs the gate's own read-only zfs queries (what the server's state says
    about a send); it is only called for commands the grammar already accepted.
    """
    argv = split_command(original_command)
    if isinstance(argv, Refused):
        return argv
    outcome = match_remote_argv(argv, config.roots, prefix=config.prefix)
    if isinstance(outcome, Refusal):
        return Refused(outcome.reason, argv)
    not_permitted = _policy_refusal(outcome, config) or _server_refusal(outcome, config, lookup)
    if not_permitted:
        return Refused(not_permitted, argv)
    return Accepted(outcome)


def split_command(original_command: str | None) -> tuple[str, ...] | Refused:
    """The client's command line as argv, split like a POSIX shell would but never run by one."""
    if original_command is None:
        return Refused("no command given: interactive logins are not allowed")
    import shlex  # noqa: PLC0415 -- imported when used: the gate's start-up time counts
    try:
        argv = tuple(shlex.split(original_command))
    except ValueError as error:
        return Refused(f"cannot split the command line: {error}")
    return argv if argv else Refused("empty command")


def _policy_refusal(command: RemoteCommand, config: GateConfig) -> str:
    """Why the configuration forbids an otherwise well-formed command; empty if it does not."""
    count = sum(1 + word.count(",") for word in command.argv[2:] if not word.startswith("-"))
    if count > config.max_names:
        return f"too many names in one command ({count} > max_names = {config.max_names})"
    scope = _scope_refusal(command, config)
    if scope:
        return scope
    if command.kind is RemoteKind.SNAPSHOT and not config.allow_snapshot:
        return "creating snapshots is not allowed (allow_snapshot = false)"
    if command.kind is RemoteKind.DESTROY and not config.allow_destroy:
        return "destroying is not allowed (allow_destroy = false)"
    if config.require_raw and command.kind in (RemoteKind.SEND, RemoteKind.ESTIMATE):
        why_not_raw = _why_not_raw(command)
        if why_not_raw:
            return f"{why_not_raw} (require_raw = true)"
    return ""


def _scope_refusal(command: RemoteCommand, config: GateConfig) -> str:
    """Holds only on own run snapshots or ``hold_patterns``; with ``labels``, the holds,
    releases and cursors of those disks only."""
    argv = command.argv
    if command.kind in (RemoteKind.HOLD, RemoteKind.RELEASE) and config.labels:
        mine = {names.hold_tag(label, config.prefix) for label in config.labels}
        if argv[2] not in mine:
            return f"hold tag {argv[2]} is not one of this key's disks ({', '.join(mine)})"
    if command.kind is RemoteKind.HOLD:
        import fnmatch  # noqa: PLC0415 -- imported when used: the gate's start-up time counts

        for snapshot in argv[3:]:
            short = snapshot.partition("@")[2]
            if not names.is_own_snapshot(short, config.prefix) and not any(
                fnmatch.fnmatchcase(short, pattern) for pattern in config.hold_patterns
            ):
                return (f"{snapshot} may not be held: not a zbackupd run snapshot and not in "
                        "hold_patterns")
    cursor = argv[3] if command.kind is RemoteKind.BOOKMARK else argv[2]
    if config.labels and command.kind in (RemoteKind.BOOKMARK, RemoteKind.DESTROY) \
            and "#" in cursor:
        label = names.cursor_label(cursor, config.prefix)
        if label not in config.labels:
            return f"bookmark {cursor} is another disk's ({label}): not this key's"
    return ""


def _why_not_raw(command: RemoteCommand) -> str:
    """Empty when the send is raw; otherwise why it is not."""
    argv = command.argv
    if "-t" in argv:
        try:
            raw = decode_resume_token(argv[argv.index("-t") + 1]).raw
        except (InvalidArgument, names.InvalidName, IndexError) as error:
            return f"unreadable resume token: {error}"
        return "" if raw else "the resume token continues a non-raw send"
    return "" if "-w" in argv else "only raw sends (-w) are allowed"


def _server_refusal(command: RemoteCommand, config: GateConfig, lookup: Lookup) -> str:
    """Why the server's own state forbids a send the grammar accepts; empty if nothing does.

    The client's word is not enough: a plaintext send (``-L -c``) is only for datasets
    whose ``encryption`` is ``off`` (with the key loaded zfs would decrypt), and a resume
    token is resolved by zfs by its GUIDs, which must be the named snapshot's own.
    """
    raw = send_is_raw(command)
    if raw is True or command.kind not in (RemoteKind.SEND, RemoteKind.ESTIMATE):
        return ""
    (dataset,) = command.datasets
    if raw is False:
        return _plaintext_refusal(dataset, config, lookup, "a plaintext send (-L -c)")
    try:
        token = decode_resume_token(command.argv[-1])
    except (InvalidArgument, names.InvalidName) as error:  # the grammar decoded it already
        return f"unreadable resume token: {error}"
    return _token_refusal(token, dataset, config, lookup)


def _plaintext_refusal(dataset: str, config: GateConfig, lookup: Lookup, what: str) -> str:
    """Empty if ``dataset``'s encryption is ``off``; otherwise (or if unknown) why not."""
    try:
        value = lookup((config.zfs, "get", "-H", "-o", "value", "encryption", dataset)).strip()
    except LookupFailed as error:
        return f"cannot check the encryption of {dataset}: {error.reason}"
    if value == "off":
        return ""
    shown = printable(value, 40) or "(empty)"
    return f"{what} of {dataset} is not allowed: it is encrypted ({shown}); send it raw (-w)"


def _token_refusal(
    token: ResumeTokenContents, dataset: str, config: GateConfig, lookup: Lookup
) -> str:
    """Empty if the token's GUIDs are those of its snapshot (and incremental source) in
    ``dataset`` and its flags fit the dataset; otherwise why not. Only name-based lookups
    run: a made-up GUID never reaches zfs, so nothing walks the pool for it."""
    if token.saved:
        return "resume tokens of a saved receive (savedok) are not allowed"
    if token.redaction:
        return f"resume tokens with redaction fields ({', '.join(token.redaction)}) are not allowed"
    why_not = _toguid_refusal(token, config, lookup) or _fromguid_refusal(
        token, dataset, config, lookup
    )
    if why_not or token.raw:
        return why_not
    return _plaintext_refusal(dataset, config, lookup, "a non-raw resume (token without rawok)")


def _toguid_refusal(token: ResumeTokenContents, config: GateConfig, lookup: Lookup) -> str:
    try:
        guid = lookup((config.zfs, "get", "-H", "-p", "-o", "value", "guid", token.toname))
    except LookupFailed as error:
        return f"cannot check the resume token's snapshot {token.toname}: {error.reason}"
    if _parse_guids(guid) != [token.toguid]:
        return f"the resume token's toguid {token.toguid} is not the guid of {token.toname}"
    return ""


def _fromguid_refusal(
    token: ResumeTokenContents, dataset: str, config: GateConfig, lookup: Lookup
) -> str:
    if token.fromguid is None:
        return ""
    listing = (config.zfs, "list", "-H", "-p", "-o", "guid", "-t", "snapshot,bookmark")
    try:
        versions = lookup((*listing, "-d", "1", dataset))
    except LookupFailed as error:
        return f"cannot list the snapshots and bookmarks of {dataset}: {error.reason}"
    if token.fromguid in _parse_guids(versions):
        return ""
    return (
        f"the resume token's incremental source (guid {token.fromguid}) is not a "
        f"snapshot or bookmark of {dataset}"
    )


def _parse_guids(text: str) -> list[int]:
    """One decimal guid per line (``-H -p``); a line that is not one yields -1."""
    return [int(line) if line.isascii() and line.isdigit() else -1 for line in text.split()]


def exec_environment() -> dict[str, str]:
    """zfs runs with a fixed PATH and the C locale (the daemon parses its English errors);
    nothing of the SSH session, the client or the login leaks into it."""
    return {"PATH": SAFE_PATH, "LC_ALL": "C"}


def printable(text: str, limit: int = LOG_COMMAND_LIMIT) -> str:
    """One line, control characters escaped, at most ``limit`` characters (plus a marker)."""
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return escaped if len(escaped) <= limit else escaped[:limit] + "...(truncated)"


# -- the shell ------------------------------------------------------------------------


Logger = Callable[[int, str], None]
Exec = Callable[[str, Sequence[str], Mapping[str, str]], NoReturn]


def syslog_logger() -> Logger:
    """Log to syslog (the journal picks it up) as ``zbackupd-gate`` in the auth facility."""
    syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID, syslog.LOG_AUTH)

    def log(priority: int, message: str) -> None:
        syslog.syslog(priority, message)

    return log


#: How long one of the gate's own zfs queries may take before the command is refused.
LOOKUP_TIMEOUT = 60.0


def run_lookup(argv: tuple[str, ...]) -> str:
    """Run one of the gate's own read-only zfs queries: argv only (never a shell), the
    scrubbed environment, no stdin; its stdout, or ``LookupFailed``."""
    import subprocess  # noqa: PLC0415 -- only sends need it; keeps every other command fast

    try:
        completed = subprocess.run(  # argv built by the gate, never a shell
            argv,
            env=exec_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=LOOKUP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise LookupFailed(argv, str(error) or type(error).__name__) from None
    if completed.returncode != 0:
        stderr = completed.stderr.decode("utf-8", "replace").strip()
        first = stderr.splitlines()[0] if stderr else "(no stderr)"
        raise LookupFailed(argv, f"exit {completed.returncode}: {printable(first, 200)}")
    return completed.stdout.decode("utf-8", "replace")


def _exec_zfs(program: str, argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    os.execvpe(program, list(argv), dict(env))  # noqa: S606 -- argv only, no shell, fixed PATH


def config_path(args: Sequence[str]) -> str:
    """The ``--config`` path from the forced command's own arguments (the admin's, not the
    client's): none, ``--config PATH`` or ``--config=PATH``; anything else is a
    configuration error."""
    match list(args):
        case []:
            return DEFAULT_CONFIG_PATH
        case [word] if word.startswith("--config=") and word != "--config=":
            return word.removeprefix("--config=")
        case ["--config", path] if path:
            return str(path)
    words = list(args)
    raise GateConfigError(
        "(command line)", [("", f"expected [--config PATH], got arguments {words!r}")]
    )


def check_config(path: str, out: Callable[[str], object]) -> int:
    """``--check-config FILE``: one line per problem (``FILE: key: reason``) or
    ``FILE: ok``; the exit status."""
    try:
        load_config(path)
    except GateConfigError as error:
        for key, reason in error.problems:
            out(f"{path}: {key}: {reason}\n" if key else f"{path}: {reason}\n")
        return EXIT_BAD_CONFIG
    out(f"{path}: ok\n")
    return 0


def run(
    args: Sequence[str],
    environ: Mapping[str, str],
    *,
    log: Logger,
    stderr: Callable[[str], object],
    exec_zfs: Exec = _exec_zfs,
    lookup: Lookup = run_lookup,
    stderr_is_terminal: bool = False,
) -> int:
    """The whole gate with its effects injected; returns the exit status of a refusal.

    On acceptance it does not return: ``exec_zfs`` replaces the process with zfs.
    Refusals go to syslog and, one line, to ``stderr`` (the client's, over SSH). What is
    wrong with the configuration stays in syslog unless ``stderr_is_terminal`` (an admin
    running the gate by hand).
    """
    client = printable(environ.get("SSH_CONNECTION", "").split(" ", 1)[0] or "local", 64)
    original = environ.get("SSH_ORIGINAL_COMMAND")
    shown = "(none)" if original is None else printable(repr(original))
    try:
        config = load_config(config_path(args))
    except GateConfigError as error:
        log(
            syslog.LOG_ERR, f"refused from {client}: {printable(str(error), 1000)}; command={shown}"
        )
        stderr(f"{SYSLOG_IDENT}: refused: the gate is misconfigured on the server\n")
        if stderr_is_terminal:
            stderr(f"{SYSLOG_IDENT}: {printable(str(error), 2000)}\n")
        return EXIT_BAD_CONFIG
    decision = decide(original, config, lookup)
    if isinstance(decision, Refused):
        log(
            syslog.LOG_WARNING,
            f"refused from {client}: {printable(decision.reason)}; command={shown}",
        )
        stderr(f"{SYSLOG_IDENT}: refused: {printable(decision.reason)}\n")
        return EXIT_REFUSED
    command = decision.command
    log(
        syslog.LOG_INFO,
        f"accepted from {client}: {command.kind.value} ({command.shape}) "
        f"datasets={printable(','.join(command.datasets))} command={shown}",
    )
    try:
        exec_zfs(config.zfs, command.argv, exec_environment())
    except OSError as error:
        reason = f"cannot run {config.zfs}: {error.strerror or type(error).__name__}"
        log(syslog.LOG_ERR, printable(f"failed for {client}: {reason}"))
        stderr(f"{SYSLOG_IDENT}: {reason}\n")
        return EXIT_NO_ZFS


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``zbackupd-gate [--config PATH]`` as the forced command, or
    ``zbackupd-gate --check-config FILE`` to validate a configuration by hand."""
    args = sys.argv[1:] if argv is None else list(argv)
    match args:
        case ["--check-config", path]:
            return check_config(path, sys.stdout.write)
        case ["--check-config", *_]:
            sys.stderr.write(f"usage: {SYSLOG_IDENT} --check-config FILE\n")
            return EXIT_BAD_CONFIG
    return run(
        args,
        os.environ,
        log=syslog_logger(),
        stderr=sys.stderr.write,
        stderr_is_terminal=sys.stderr.isatty(),
    )


if __name__ == "__main__":
    sys.exit(main())
