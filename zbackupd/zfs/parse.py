"""Pure parsers of ``zfs``/``zpool`` output, and stderr → typed errors.

The commands are built by ``argv.py`` with ``-H -p`` (tab-separated, exact numbers)
and fixed ``-o`` columns, so each parser knows its columns. Where the command ran
(locally or over SSH) does not matter here. The child runs with ``LC_ALL=C``
(``runner.child_environment``): stderr is untranslated, which ``classify_error``
relies on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from zbackupd.core.model import Bookmark, Encryption, Hold, Snapshot
from zbackupd.errors import CommandError, PermanentError
from zbackupd.zfs import names
from zbackupd.zfs.names import InvalidName


class ParseError(PermanentError):
    """Output did not have the expected shape (a different zfs version, a wrong column
    list). ``line`` is the offending line; ``reason`` says what was expected."""

    def __init__(self, what: str, line: str, reason: str) -> None:
        self.what = what
        self.line = line
        self.reason = reason
        super().__init__(f"cannot parse {what} line {line[:200]!r}: {reason}")


def _rows(text: str, what: str, columns: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("\t", columns - 1)
        if len(fields) != columns:
            raise ParseError(what, line, f"expected {columns} tab-separated fields")
        rows.append(fields)
    return rows


def _integer(what: str, line: str, value: str) -> int:
    if not value.isdigit():
        raise ParseError(what, line, f"{value!r} is not a non-negative integer")
    return int(value)


# -- listings ------------------------------------------------------------------------


#: A snapshot's or bookmark's short name as ``names`` accepts it (the fast path below).
_SHORT_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
#: name, guid, createtxg, creation
_VERSION_COLUMNS = 4


def parse_versions(text: str) -> tuple[tuple[Snapshot, ...], tuple[Bookmark, ...]]:
    """``zfs list -H -p -o name,guid,createtxg,creation`` of snapshots and/or bookmarks.

    ``@`` marks a snapshot, ``#`` a bookmark; the order of the output is kept. A listing
    of a big server has millions of rows: each dataset part is validated once, the short
    name with one match; any row the fast path does not clear goes through the full
    ``names`` check, which raises with the exact reason.
    """
    snapshots: list[Snapshot] = []
    bookmarks: list[Bookmark] = []
    valid_datasets: set[str] = set()
    fast_short = _SHORT_NAME.fullmatch
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != _VERSION_COLUMNS:
            if not line.strip():
                continue
            raise ParseError("snapshot listing", line, "expected 4 tab-separated fields")
        name, guid, createtxg, creation = fields
        digits = guid + createtxg + creation
        if not (digits.isascii() and digits.isdigit() and guid and createtxg and creation):
            for value in (guid, createtxg, creation):
                _integer("snapshot listing", line, value)
        if "@" in name:
            separator, validate = "@", names.validate_snapshot_name
        elif "#" in name:
            separator, validate = "#", names.validate_bookmark_name
        else:
            raise ParseError("snapshot listing", line, "name is neither ds@snap nor ds#mark")
        dataset, _, short = name.partition(separator)
        if (
            dataset not in valid_datasets
            or len(name) > names.MAX_NAME_LENGTH
            or not fast_short(short)
            or short in (".", "..")
        ):
            try:
                validate(name)
            except InvalidName as error:
                raise ParseError("snapshot listing", line, error.reason) from None
            valid_datasets.add(dataset)
        if separator == "@":
            snapshots.append(Snapshot(name, int(guid), int(createtxg), int(creation)))
        else:
            bookmarks.append(Bookmark(name, int(guid), int(createtxg), int(creation)))
    return tuple(snapshots), tuple(bookmarks)


def parse_snapshots(text: str) -> tuple[Snapshot, ...]:
    """Snapshots of a ``zfs list -t snapshot`` (bookmarks in the output are an error)."""
    snapshots, bookmarks = parse_versions(text)
    if bookmarks:
        raise ParseError("snapshot listing", bookmarks[0].name, "bookmark in a snapshot listing")
    return snapshots


def parse_bookmarks(text: str) -> tuple[Bookmark, ...]:
    """Bookmarks of a ``zfs list -t bookmark``."""
    snapshots, bookmarks = parse_versions(text)
    if snapshots:
        raise ParseError("bookmark listing", snapshots[0].name, "snapshot in a bookmark listing")
    return bookmarks


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """A filesystem or volume and how it is stored (which picks its send mode)."""

    name: str
    guid: int
    encryption: Encryption
    encryption_root: str | None
    volume: bool = False
    #: Bytes written since the newest snapshot (all referenced bytes without one); None
    #: when ZFS did not say.
    written: int | None = None


def parse_datasets(text: str) -> tuple[DatasetRow, ...]:
    """``zfs list -H -p -o name,type,guid,encryption,encryptionroot,written``."""
    rows = []
    for fields in _rows(text, "dataset listing", 6):
        line = "\t".join(fields)
        name, kind, guid, encryption, root, written = fields
        try:
            names.validate_dataset_name(name)
        except InvalidName as error:
            raise ParseError("dataset listing", line, error.reason) from None
        if kind not in ("filesystem", "volume"):
            raise ParseError("dataset listing", line, f"type {kind!r} is not filesystem/volume")
        mode = Encryption.PLAIN if encryption == "off" else Encryption.ENCRYPTED
        rows.append(
            DatasetRow(
                name,
                _integer("dataset listing", line, guid),
                mode,
                None if root in ("-", "") else root,
                volume=kind == "volume",
                written=None if written in ("-", "") else _integer("dataset listing", line,
                                                                   written),
            )
        )
    return tuple(rows)


def parse_holds(text: str) -> tuple[Hold, ...]:
    """``zfs holds -H -p``: ``snapshot<TAB>tag<TAB>epoch seconds``."""
    holds = []
    for fields in _rows(text, "holds listing", 3):
        line = "\t".join(fields)
        snapshot, tag, timestamp = fields
        holds.append(Hold(snapshot, tag, _integer("holds listing", line, timestamp.strip())))
    return tuple(holds)


def parse_properties(text: str) -> dict[str, dict[str, str]]:
    """``zfs get``/``zpool get -H -p -o name,property,value`` → {name: {property: value}}.

    Values are kept as text (``-`` means "none", e.g. ``receive_resume_token``).
    """
    result: dict[str, dict[str, str]] = {}
    for name, prop, value in _rows(text, "property listing", 3):
        result.setdefault(name, {})[prop] = value
    return result


def resume_token(value: str | None) -> str | None:
    """The ``receive_resume_token`` property as a token, or None for ``-``/missing."""
    return None if value in (None, "", "-") else value


def parse_send_estimate(text: str) -> int:
    """``zfs send -nvP`` → estimated stream bytes, from its ``size<TAB><bytes>`` line."""
    sizes = [line for line in text.splitlines() if line.startswith("size\t")]
    if not sizes:
        raise ParseError("send estimate", text.strip()[-200:], "no 'size<TAB>bytes' line")
    last = sizes[-1]
    return _integer("send estimate", last, last.partition("\t")[2].strip())


class PoolHealth(Enum):
    """``zpool list -o health`` values (vdev_state_t names)."""

    ONLINE = "ONLINE"
    DEGRADED = "DEGRADED"
    FAULTED = "FAULTED"
    OFFLINE = "OFFLINE"
    REMOVED = "REMOVED"
    UNAVAIL = "UNAVAIL"
    SUSPENDED = "SUSPENDED"


@dataclass(frozen=True, slots=True)
class PoolRow:
    """One imported pool: the GUID is its identity, health says if it can be used."""

    name: str
    guid: int
    health: PoolHealth


def parse_pool_list(text: str) -> tuple[PoolRow, ...]:
    """``zpool list -H -p -o name,guid,health``."""
    rows = []
    for fields in _rows(text, "pool listing", 3):
        line = "\t".join(fields)
        name, guid, health = fields
        try:
            state = PoolHealth(health.strip())
        except ValueError:
            raise ParseError("pool listing", line, f"unknown health {health!r}") from None
        rows.append(PoolRow(name, _integer("pool listing", line, guid), state))
    return tuple(rows)


@dataclass(frozen=True, slots=True)
class ImportablePool:
    """A pool ``zpool import -d <device>`` offers: its name as written on the disk (the
    name a temporary import name hides), its GUID and its state."""

    name: str
    guid: int
    state: str


def parse_import_listing(text: str) -> tuple[ImportablePool, ...]:
    """``zpool import -d <device>`` (no pool argument): one block per pool, opened by
    ``pool: <name>`` and followed by ``id: <guid>`` and ``state: <state>`` lines
    (tests/data/zfs-output/zpool-import-list.stdout). A pool without an id is an error:
    the GUID is what proves the pool."""
    pools: list[ImportablePool] = []
    name: str | None = None
    guid: int | None = None
    state = ""

    def close_block(line: str) -> None:
        if name is None:
            return
        if guid is None:
            raise ParseError("import listing", line, f"pool {name!r} has no 'id:' line")
        pools.append(ImportablePool(name, guid, state))

    for line in text.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "pool":
            close_block(line)
            name, guid, state = value.strip(), None, ""
        elif key == "id" and name is not None:
            guid = _integer("import listing", line, value.strip())
        elif key == "state" and name is not None:
            state = value.strip()
    close_block(text[-200:])
    return tuple(pools)


def parse_vdev_paths(text: str) -> tuple[str, ...]:
    """The device paths in ``zpool status -P <pool>``'s config section (the vdev lines
    whose name is an absolute path; tests/data/zfs-output/zpool-status-P-online.stdout)."""
    paths = []
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0].startswith("/"):
            paths.append(fields[0])
    return tuple(paths)


# -- stderr → typed errors -----------------------------------------------------------
#
# Messages as OpenZFS 2.3 prints them, from:
#   lib/libzfs/libzfs_util.c      zfs_standard_error_fmt, zpool_standard_error_fmt,
#                                 libzfs_error_description ("<action>: <description>")
#   lib/libzfs/libzfs_sendrecv.c  zfs_receive_one (the ioctl errno switch),
#                                 zfs_send_resume_impl, zfs_send_resume_token_to_nvlist
#   lib/libzfs/libzfs_crypto.c    zfs_crypto_load_key ("Key load error: ...")
#   cmd/zpool/zpool_main.c        import ("no such pool available")
# Several are split over two lines ("... does not\nmatch incremental source"), so
# matching runs on whitespace-collapsed text.


class ZfsCommandError(CommandError):
    """A zfs/zpool command failed for a reason ``classify_error`` recognised.

    Each subclass fixes whether retrying later can help (``retryable``); ``subject``
    is the first quoted name in the message, when there is one.
    """

    retryable = False

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(argv, returncode, stderr, transient=self.retryable)
        quoted = re.search(r"'([^']+)'", stderr)
        self.subject: str | None = quoted.group(1) if quoted else None

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.argv, self.returncode, self.stderr))


class DatasetNotFound(ZfsCommandError):
    """The dataset, snapshot or bookmark does not exist."""


class PoolNotFound(ZfsCommandError):
    """No such pool (not imported, or not on the device given to import)."""


class PoolActiveElsewhere(ZfsCommandError):
    """The pool was last imported by another host; zbackupd never forces (-f) that."""


class PoolSuspended(ZfsCommandError):
    """Pool I/O is suspended (disk pulled mid-write): re-plug it, then ``zpool clear``."""

    retryable = True


class PoolBusy(ZfsCommandError):
    """The pool or dataset is busy right now (a hold, a concurrent operation)."""

    retryable = True


class NoCommonSnapshot(ZfsCommandError):
    """The incremental source is not the target's most recent snapshot (or is gone)."""


class DestinationModified(ZfsCommandError):
    """The target was written since its last snapshot; only an explicit policy rolls back."""


class DestinationExists(ZfsCommandError):
    """A full stream met an existing target (zbackupd never adds ``-F`` on its own)."""


class DatasetExists(ZfsCommandError):
    """``zfs create`` found the dataset already there."""


class ReceiveStatePresent(ZfsCommandError):
    """The target holds a partial ``receive -s``: resume it or ``receive -A`` first."""


class StreamInterrupted(ZfsCommandError):
    """The stream ended early (link dropped, sender killed); a resume token may be left.

    ``resume_token`` is the token ``zfs receive -s`` printed ("zfs send -t <token>"),
    when it printed one.
    """

    retryable = True

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(argv, returncode, stderr)
        printed = re.search(r"zfs send -t ([0-9]+-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+)", stderr)
        self.resume_token: str | None = printed.group(1) if printed else None


class IncompatibleStream(ZfsCommandError):
    """The stream cannot land on this target (raw vs non-raw mix, ``-e`` into an
    encrypted pool, ``-L`` mismatch): a send-mode bug, not a passing condition."""


class ResumeTokenInvalid(ZfsCommandError):
    """The resume token is corrupt or its snapshot is gone: abort the partial receive."""


class KeyIncorrect(ZfsCommandError):
    """``load-key`` refused the key."""


class KeyAlreadyLoaded(ZfsCommandError):
    """``load-key`` found the key already loaded (harmless for an idempotent unlock)."""


class KeyNotLoaded(ZfsCommandError):
    """A non-raw receive needs the disk pool's key loaded ("inherited key must be loaded")."""


class OutOfSpace(ZfsCommandError):
    """The disk (or a quota) is full."""


class PermissionDenied(ZfsCommandError):
    """Not allowed (missing root or ``zfs allow`` delegation)."""


class GateRefused(ZfsCommandError):
    """The server's ``zbackupd-gate`` refused the command: the gate config must allow it."""


#: (error class, needles): the first class with a needle in the collapsed stderr wins.
#: Order matters: a suspended pool can surface inside any other message.
_CLASSIFIERS: tuple[tuple[type[ZfsCommandError], tuple[str, ...]], ...] = (
    (PoolSuspended, ("pool I/O is currently suspended",)),
    (GateRefused, ("zbackupd-gate: refused:",)),
    (KeyIncorrect, ("Incorrect key provided",)),
    (KeyAlreadyLoaded, ("Key already loaded",)),
    (KeyNotLoaded, ("inherited key must be loaded", "key must be loaded")),
    (
        IncompatibleStream,
        (
            "incompatible embedded data stream feature with encrypted receive",
            "IV set guid mismatch",
            "cannot perform raw receive on top of existing unencrypted dataset",
            "incremental send stream requires -L",
            "encryption key does not match existing key",
        ),
    ),
    (
        ResumeTokenInvalid,
        (
            "resume token is corrupt",
            "is no longer the same snapshot used in the initial send",
            "used in the initial send no longer exists",
        ),
    ),
    (NoCommonSnapshot, ("does not match incremental source",)),
    (DestinationModified, ("has been modified since most recent snapshot",)),
    (ReceiveStatePresent, ('contains partially-complete state from "zfs receive -s"',)),
    (
        DestinationExists,
        (
            "must specify -F to overwrite it",
            "destination already exists",
            "destination has snapshots",
        ),
    ),
    (DatasetExists, ("dataset already exists",)),
    (
        StreamInterrupted,
        ("checksum mismatch or incomplete stream", "failed to read from stream"),
    ),
    (
        PoolActiveElsewhere,
        ("pool was previously in use from another system", "imported on a different host"),
    ),
    (PoolNotFound, ("no such pool available", "no such pool")),
    (
        DatasetNotFound,
        (
            "dataset does not exist",
            "no such pool or dataset",
            "could not find any snapshots to destroy",
        ),
    ),
    (OutOfSpace, ("out of space", "space quota exceeded")),
    (PoolBusy, ("pool is busy", "dataset is busy", "pool or dataset is busy", "is busy.")),
    (PermissionDenied, ("permission denied", "Permission denied")),
)


def classify_error(argv: Sequence[str], returncode: int, stderr: str) -> CommandError:
    """Turn a failed command into the most specific typed error its stderr allows.

    Unrecognised failures stay a plain, permanent ``CommandError`` with everything
    attached: better to stop and tell the admin than to retry blindly.
    """
    collapsed = " ".join(stderr.split())
    is_zpool = bool(argv) and argv[0].endswith("zpool")
    for error_class, needles in _CLASSIFIERS:
        if error_class is PoolNotFound and not is_zpool:
            continue  # zfs says "no such pool or dataset" for datasets too
        if any(needle in collapsed for needle in needles):
            return error_class(argv, returncode, stderr)
    return CommandError(argv, returncode, stderr)
