"""The gate's configuration (``/etc/zbackupd/gate.toml``), parsed strictly: every
problem at once, each with its key, so ``zbackupd-gate --check-config`` can list them.

Standard library only, like the gate itself (``tomllib`` is imported when a file is
read: the gate's start-up time counts on every command).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from zbackupd.core.values import Record
from zbackupd.errors import PermanentError
from zbackupd.zfs import names

#: Where the forced command reads its configuration unless ``--config`` says otherwise.
DEFAULT_CONFIG_PATH = "/etc/zbackupd/gate.toml"
#: The only PATH zfs is looked up in and runs with: never the client's or the login's.
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Exit status of a refused command (the shell's "found but cannot execute").
EXIT_REFUSED = 126
#: Exit status when zfs itself cannot be started (the shell's "not found").
EXIT_NO_ZFS = 127
#: Exit status when the gate's own configuration is unusable (sysexits EX_CONFIG).
EXIT_BAD_CONFIG = 78
#: How much of a refused command line goes into a log line.
LOG_COMMAND_LIMIT = 300
SYSLOG_IDENT = "zbackupd-gate"

_BARE_PROGRAM_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_ABSOLUTE_PATH_RE = re.compile(r"(/[A-Za-z0-9_.+-]+)+")


class GateConfigError(PermanentError):
    """The gate's configuration file is missing, unreadable or invalid.

    ``path`` is the file, ``problems`` every ``(key, reason)`` found (key ``""`` for
    the file as a whole). The gate refuses every command until it is fixed.
    """

    def __init__(self, path: str, problems: Sequence[tuple[str, str]]) -> None:
        self.path = path
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        listed = "; ".join(f"{key}: {reason}" if key else reason for key, reason in self.problems)
        super().__init__(f"invalid gate configuration {path}: {listed}")


#: Names one command may carry unless ``max_names`` says otherwise: far above what the
#: daemon sends (its snapshot batches stop at 128 KiB of command line), far below what
#: would let one command keep the server busy for long.
DEFAULT_MAX_NAMES = 10_000
_HOLD_PATTERN_RE = re.compile(r"[A-Za-z0-9_.:*?\[\]-]{1,255}")


class GateConfig(Record):
    """What the gate allows: datasets under ``roots``, and which kinds of writes.

    ``allow_snapshot``: ``zfs snapshot`` of zbackupd's own run snapshots.
    ``allow_destroy``: ``zfs destroy`` of zbackupd's own snapshots and cursor bookmarks
    (moving a cursor destroys the old bookmark).
    ``require_raw``: refuse every send that is not raw (``-w``, or a resume token of a
    raw send): only for servers whose datasets are all encrypted.
    ``labels``: the disks this key acts for; empty: any. With labels, holds, releases
    and cursor bookmarks of other disks are refused (one backup host cannot release
    another's holds or move its cursors).
    ``hold_patterns``: snapshot short names (globs) that may be held besides zbackupd's
    own run snapshots, for ``snapshots = "reuse"`` (e.g. ``autosnap_*_daily``).
    ``max_names``: the most snapshot/dataset names one command may carry.
    """

    __slots__ = ("allow_destroy", "allow_snapshot", "hold_patterns", "labels", "max_names",
                 "prefix", "require_raw", "roots", "zfs")
    roots: tuple[str, ...]
    allow_snapshot: bool
    allow_destroy: bool
    require_raw: bool
    prefix: str
    #: An absolute path, or a bare name looked up in ``SAFE_PATH`` only.
    zfs: str
    labels: tuple[str, ...]
    hold_patterns: tuple[str, ...]
    max_names: int

    def __init__(
        self,
        roots: tuple[str, ...],
        *,
        allow_snapshot: bool = True,
        allow_destroy: bool = True,
        require_raw: bool = False,
        prefix: str = names.DEFAULT_PREFIX,
        zfs: str = "zfs",
        labels: tuple[str, ...] = (),
        hold_patterns: tuple[str, ...] = (),
        max_names: int = DEFAULT_MAX_NAMES,
    ) -> None:
        self._init(
            roots=roots,
            allow_snapshot=allow_snapshot,
            allow_destroy=allow_destroy,
            require_raw=require_raw,
            prefix=prefix,
            zfs=zfs,
            labels=labels,
            hold_patterns=hold_patterns,
            max_names=max_names,
        )


_DEFAULTS = GateConfig(roots=())
_BOOLEAN_KEYS = ("allow_snapshot", "allow_destroy", "require_raw")
_KNOWN_KEYS = frozenset(
    {"roots", "prefix", "zfs", "labels", "hold_patterns", "max_names", *_BOOLEAN_KEYS}
)


def parse_config(text: str, path: str) -> GateConfig:
    """Parse and strictly validate a gate TOML document; every problem in one error."""
    import tomllib  # noqa: PLC0415 -- imported when used: the gate's start-up time counts
    try:
        raw = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as error:
        raise GateConfigError(path, [("", f"not valid TOML: {error}")]) from None
    problems: list[tuple[str, str]] = [
        (key, "unknown key (known: " + ", ".join(sorted(_KNOWN_KEYS)) + ")")
        for key in raw
        if key not in _KNOWN_KEYS
    ]
    roots = _parse_roots(raw.get("roots"), problems)
    flags = {key: _parse_bool(raw, key, problems) for key in _BOOLEAN_KEYS}
    prefix = _parse_prefix(raw.get("prefix", _DEFAULTS.prefix), problems)
    zfs = _parse_zfs(raw.get("zfs", _DEFAULTS.zfs), problems)
    labels = _parse_strings(raw, "labels", names.validate_disk_label, problems)
    hold_patterns = _parse_strings(raw, "hold_patterns", _validate_hold_pattern, problems)
    max_names = raw.get("max_names", DEFAULT_MAX_NAMES)
    if isinstance(max_names, bool) or not isinstance(max_names, int) or max_names < 1:
        problems.append(("max_names", f"must be a whole number >= 1, not {max_names!r}"))
        max_names = DEFAULT_MAX_NAMES
    if problems:
        raise GateConfigError(path, problems)
    return GateConfig(
        roots=roots,
        allow_snapshot=flags["allow_snapshot"],
        allow_destroy=flags["allow_destroy"],
        require_raw=flags["require_raw"],
        prefix=prefix,
        zfs=zfs,
        labels=labels,
        hold_patterns=hold_patterns,
        max_names=max_names,
    )


def _validate_hold_pattern(pattern: str) -> str:
    if not _HOLD_PATTERN_RE.fullmatch(pattern):
        raise names.InvalidName("hold pattern", pattern,
                                "must be a snapshot-name glob of [A-Za-z0-9_.:-*?[]]")
    return pattern


def _parse_strings(
    raw: Mapping[str, object],
    key: str,
    validate: Callable[[str], str],
    problems: list[tuple[str, str]],
) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.append((key, "must be a list of strings"))
        return ()
    good: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            problems.append((f"{key}[{index}]", f"must be a string, not {type(item).__name__}"))
            continue
        try:
            good.append(validate(item))
        except names.InvalidName as error:
            problems.append((f"{key}[{index}]", str(error)))
    return tuple(dict.fromkeys(good))


def load_config(path: str) -> GateConfig:
    """Read and validate the configuration file at ``path``."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise GateConfigError(path, [("", error.strerror or type(error).__name__)]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GateConfigError(path, [("", "not UTF-8")]) from None
    return parse_config(text, path)


def _parse_roots(value: object, problems: list[tuple[str, str]]) -> tuple[str, ...]:
    if value is None:
        problems.append(("roots", "required: the dataset roots the client may read and send"))
        return ()
    if not isinstance(value, list) or not value:
        problems.append(("roots", "must be a non-empty list of dataset names"))
        return ()
    roots: list[str] = []
    for index, root in enumerate(value):
        if not isinstance(root, str):
            problems.append((f"roots[{index}]", f"must be a string, not {type(root).__name__}"))
            continue
        try:
            roots.append(names.validate_dataset_name(root))
        except names.InvalidName as error:
            problems.append((f"roots[{index}]", str(error)))
    return tuple(dict.fromkeys(roots))


def _parse_bool(raw: Mapping[str, object], key: str, problems: list[tuple[str, str]]) -> bool:
    default: bool = getattr(_DEFAULTS, key)
    value = raw.get(key, default)
    if not isinstance(value, bool):
        problems.append((key, f"must be true or false, not {value!r}"))
        return default
    return value


def _parse_prefix(value: object, problems: list[tuple[str, str]]) -> str:
    if not isinstance(value, str):
        problems.append(("prefix", f"must be a string, not {type(value).__name__}"))
        return _DEFAULTS.prefix
    try:
        return names.validate_prefix(value)
    except names.InvalidName as error:
        problems.append(("prefix", str(error)))
        return _DEFAULTS.prefix


def _parse_zfs(value: object, problems: list[tuple[str, str]]) -> str:
    if not isinstance(value, str):
        problems.append(("zfs", f"must be a string, not {type(value).__name__}"))
        return _DEFAULTS.zfs
    is_absolute = bool(_ABSOLUTE_PATH_RE.fullmatch(value)) and "/../" not in value + "/"
    if not (is_absolute or _BARE_PROGRAM_RE.fullmatch(value)) or value in (".", ".."):
        reason = f"{value!r} must be an absolute path or a bare program name (from {SAFE_PATH})"
        problems.append(("zfs", reason))
        return _DEFAULTS.zfs
    return value
