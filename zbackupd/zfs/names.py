"""The grammar of ZFS names and of zbackupd's own names.

Standard library only: the server-side gate (``zbackupd-gate``) imports this module to
decide what a client may touch, so it must not pull in the daemon's dependencies.

The accepted grammar is deliberately narrower than OpenZFS's (module/zcommon/
zfs_namecheck.c also allows spaces and ``%``): a component is ``[A-Za-z0-9_.:-]+``,
joined by ``/``, with ``@`` before a snapshot and ``#`` before a bookmark. Nothing a
shell or an option parser could misread survives: no whitespace, no quotes, no
``;|&$`` and no leading ``-`` (datasets start with a pool name, which starts with a
letter; tags and labels must start with a letter or digit).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from zbackupd.errors import PermanentError

#: ZFS_MAX_DATASET_NAME_LEN is 256 including the terminating NUL.
MAX_NAME_LENGTH = 255
#: Hold tags live in a MAXNAMELEN buffer (256 including the NUL).
MAX_TAG_LENGTH = 255
#: The prefix of every name zbackupd creates unless configured otherwise.
DEFAULT_PREFIX = "zbackupd"

_COMPONENT = r"[A-Za-z0-9_.:-]+"
_COMPONENT_RE = re.compile(_COMPONENT)
_POOL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]*")
# Pool names that zpool reserves for vdev keywords (module/zcommon/zfs_namecheck.c).
_RESERVED_POOL_PREFIXES = ("mirror", "raidz", "draid", "spare", "log")
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")
_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_TIMESTAMP_RE = r"[0-9]{8}T[0-9]{6}Z"


class InvalidName(PermanentError):
    """A name does not follow the grammar; nothing was run with it.

    ``kind`` says what was expected (``dataset``, ``snapshot``, ...), ``name`` is the
    refused text and ``reason`` the rule it broke.
    """

    def __init__(self, kind: str, name: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f"invalid {kind} name {name!r}: {reason}")


# -- ZFS names -----------------------------------------------------------------------


def _check_length(kind: str, name: str, limit: int = MAX_NAME_LENGTH) -> None:
    if not name:
        raise InvalidName(kind, name, "empty")
    if len(name) > limit:
        raise InvalidName(kind, name, f"longer than {limit} characters")


def _check_component(kind: str, whole: str, component: str) -> None:
    if not _COMPONENT_RE.fullmatch(component):
        raise InvalidName(kind, whole, f"component {component!r} is not [A-Za-z0-9_.:-]+")
    if component in (".", ".."):
        raise InvalidName(kind, whole, f"component {component!r} is reserved")


def validate_pool_name(name: str) -> str:
    """Return ``name`` if it is a pool name zbackupd accepts, else raise ``InvalidName``."""
    _check_length("pool", name)
    if not _POOL_RE.fullmatch(name):
        raise InvalidName("pool", name, "must start with a letter and use [A-Za-z0-9_.:-]")
    if name.startswith(_RESERVED_POOL_PREFIXES):
        raise InvalidName("pool", name, "begins with a reserved vdev keyword")
    if re.fullmatch(r"c[0-9].*", name):
        raise InvalidName("pool", name, "looks like a disk name (c[0-9]...)")
    return name


def validate_dataset_name(name: str) -> str:
    """Return ``name`` if it is a filesystem/volume name (``pool/a/b``), else raise."""
    _check_length("dataset", name)
    if "@" in name or "#" in name:
        raise InvalidName("dataset", name, "contains '@' or '#'")
    pool, *rest = name.split("/")
    try:
        validate_pool_name(pool)
    except InvalidName as error:
        raise InvalidName("dataset", name, f"pool part: {error.reason}") from None
    for component in rest:
        _check_component("dataset", name, component)
    return name


def split_snapshot_name(name: str) -> tuple[str, str]:
    """Split ``pool/fs@snap`` into ``("pool/fs", "snap")`` after validating it."""
    validate_snapshot_name(name)
    dataset, _, short = name.partition("@")
    return dataset, short


def split_bookmark_name(name: str) -> tuple[str, str]:
    """Split ``pool/fs#mark`` into ``("pool/fs", "mark")`` after validating it."""
    validate_bookmark_name(name)
    dataset, _, short = name.partition("#")
    return dataset, short


def _validate_versioned(kind: str, name: str, separator: str) -> str:
    _check_length(kind, name)
    if name.count(separator) != 1:
        raise InvalidName(kind, name, f"needs exactly one {separator!r}")
    dataset, _, short = name.partition(separator)
    try:
        validate_dataset_name(dataset)
    except InvalidName as error:
        raise InvalidName(kind, name, f"dataset part: {error.reason}") from None
    _check_component(kind, name, short)
    return name


def validate_snapshot_name(name: str) -> str:
    """Return ``name`` if it is a full snapshot name (``pool/fs@snap``), else raise."""
    return _validate_versioned("snapshot", name, "@")


def validate_bookmark_name(name: str) -> str:
    """Return ``name`` if it is a full bookmark name (``pool/fs#mark``), else raise."""
    return _validate_versioned("bookmark", name, "#")


def validate_short_name(name: str, kind: str = "snapshot") -> str:
    """Validate the part after ``@`` or ``#`` on its own."""
    _check_length(kind, name)
    _check_component(kind, name, name)
    return name


def validate_hold_tag(tag: str) -> str:
    """Return ``tag`` if it is a hold tag zbackupd accepts (never option-like), else raise."""
    _check_length("hold tag", tag, MAX_TAG_LENGTH)
    if not _TAG_RE.fullmatch(tag):
        raise InvalidName("hold tag", tag, "must start with [A-Za-z0-9] and use [A-Za-z0-9_.:-]")
    return tag


def validate_disk_label(label: str) -> str:
    """Return ``label`` if it can be embedded in bookmark and hold names, else raise."""
    if not _LABEL_RE.fullmatch(label):
        raise InvalidName("disk label", label, "must be [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    return label


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start zbackupd's own names, else raise."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise InvalidName("prefix", prefix, "must be [A-Za-z][A-Za-z0-9_.-]{0,31}")
    return prefix


def is_valid(validator: Callable[[str], str], name: str) -> bool:
    """True when ``validator(name)`` accepts ``name`` (for filters and assertions)."""
    try:
        validator(name)
    except InvalidName:
        return False
    return True


# -- zbackupd's own names ------------------------------------------------------------


def run_snapshot_short_name(when: datetime, prefix: str = DEFAULT_PREFIX) -> str:
    """The name of a run snapshot taken at ``when``: ``<prefix>_YYYYMMDDTHHMMSSZ`` (UTC).

    Names only help humans; the planner orders by createtxg and matches by guid.
    """
    if when.tzinfo is None:
        raise ValueError("run snapshot time must be timezone-aware")
    return f"{validate_prefix(prefix)}_{when.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)}"


def run_snapshot_name(dataset: str, when: datetime, prefix: str = DEFAULT_PREFIX) -> str:
    """The full name ``dataset@<prefix>_<UTC timestamp>`` of a run snapshot."""
    return validate_snapshot_name(f"{dataset}@{run_snapshot_short_name(when, prefix)}")


def run_snapshot_time(short_name: str, prefix: str = DEFAULT_PREFIX) -> datetime | None:
    """The UTC time encoded in an own run snapshot's short name, or None if not own."""
    match = re.fullmatch(rf"{re.escape(prefix)}_({_TIMESTAMP_RE})", short_name)
    if match is None:
        return None
    try:
        return datetime.strptime(match.group(1), _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:  # e.g. month 13: shaped like ours, but not a time we wrote
        return None


#: Between a cursor's label and its suffix: a character the label grammar excludes, so
#: ``<prefix>_<label>:<guid>`` parses one way only (with ``_``, disk ``a``'s cursor
#: ``zbackupd_a_5`` would be disk ``a_5``'s legacy cursor, and moving one would destroy
#: the other's).
CURSOR_SUFFIX_SEPARATOR = ":"
_CURSOR_RE = r"(?P<label>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})(?::(?P<guid>[0-9]{1,20}))?"


def cursor_bookmark_short_name(
    disk_label: str, prefix: str = DEFAULT_PREFIX, *, guid: int | None = None
) -> str:
    """A cursor bookmark's short name: ``<prefix>_<disklabel>:<guid>`` (the guid of the
    snapshot it marks, so two cursors of one disk never share a name), or without
    ``guid`` the legacy ``<prefix>_<disklabel>``."""
    head = f"{validate_prefix(prefix)}_{validate_disk_label(disk_label)}"
    if guid is None:
        return head
    if isinstance(guid, bool) or not isinstance(guid, int) or not 0 <= guid < 2**64:
        raise InvalidName("bookmark", f"{head}{CURSOR_SUFFIX_SEPARATOR}{guid}",
                          "the guid suffix must be an integer in 0..2**64-1")
    return f"{head}{CURSOR_SUFFIX_SEPARATOR}{guid}"


def cursor_bookmark_name(
    dataset: str, disk_label: str, prefix: str = DEFAULT_PREFIX, *, guid: int | None = None
) -> str:
    """A per-disk cursor bookmark ``dataset#<prefix>_<disklabel>[:<guid>]`` on the server."""
    short = cursor_bookmark_short_name(disk_label, prefix, guid=guid)
    return validate_bookmark_name(f"{dataset}#{short}")


def cursor_label(name: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The disk label whose cursor the bookmark ``name`` (full or short) is, else None.

    A disk's cursors are ``<prefix>_<label>`` (legacy) and ``<prefix>_<label>:<digits>``;
    the disk's cursor is the newest (createtxg) of them.
    """
    match = re.fullmatch(f"{re.escape(prefix)}_{_CURSOR_RE}", _short_part(name, "#"))
    return match.group("label") if match else None


def is_cursor_of(name: str, disk_label: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True when the bookmark ``name`` (full or short) is one of disk ``disk_label``'s
    cursors."""
    return cursor_label(name, prefix) == disk_label


def hold_tag(disk_label: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The hold tag ``<prefix>_<disklabel>`` that pins a snapshot for one disk."""
    return validate_hold_tag(f"{validate_prefix(prefix)}_{validate_disk_label(disk_label)}")


def _short_part(name: str, separator: str) -> str:
    return name.rpartition(separator)[2] if separator in name else name


def is_own_snapshot(name: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True for zbackupd's run snapshots (full ``ds@snap`` or just the short name)."""
    return run_snapshot_time(_short_part(name, "@"), prefix) is not None


def is_own_bookmark(name: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True for zbackupd's cursor bookmarks (full ``ds#mark`` or just the short name):
    ``<prefix>_<label>`` or ``<prefix>_<label>:<digits>``."""
    return cursor_label(name, prefix) is not None


def is_own_hold_tag(tag: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True for hold tags zbackupd places (``<prefix>_<disklabel>``)."""
    head = f"{prefix}_"
    return tag.startswith(head) and bool(_LABEL_RE.fullmatch(tag[len(head) :]))


def within_roots(dataset: str, roots: Iterable[str]) -> bool:
    """True when ``dataset`` is one of ``roots`` or below one of them.

    Compares whole components: ``tank/a`` is not within ``tank/ab``.
    """
    return any(dataset == root or dataset.startswith(root + "/") for root in roots)
