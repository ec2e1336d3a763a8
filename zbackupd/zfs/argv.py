"""Pure argv builders for every ``zfs``/``zpool`` command zbackupd issues.

Standard library only: ``zbackupd-gate`` imports this module on the backup server.

Commands that may run on the server (list, holds, snapshot, hold, release,
bookmark, destroy of own names, send) are described ONCE, in ``REMOTE_SHAPES``: the
builders render their argv from those shapes, and ``match_remote_argv`` (the gate's
check) accepts an argv only if it fits one of them. One grammar, two users: whatever
the daemon builds, the gate accepts, and nothing else.

Local-only commands (receive, get, zpool, keys) are plain builders below the table.
Every builder validates its inputs and raises a typed error; none of them takes a
secret (keys travel on stdin, see ``facade.Zfs.load_key``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from enum import Enum

from zbackupd.core.values import Encryption, Record
from zbackupd.errors import PermanentError
from zbackupd.zfs import names
from zbackupd.zfs.names import InvalidName

Argv = tuple[str, ...]

ZFS = "zfs"
ZPOOL = "zpool"

#: Columns of every snapshot/bookmark listing; ``parse.parse_snapshots`` reads them.
VERSION_LIST_FIELDS = "name,guid,createtxg,creation"
#: Columns of the dataset listing; ``parse.parse_datasets`` reads them. ``written`` (bytes
#: since the newest snapshot) lets an unchanged dataset go without a new run snapshot.
DATASET_LIST_FIELDS = "name,type,guid,encryption,encryptionroot,written"
#: Columns of ``zfs get``/``zpool get``; ``parse.parse_properties`` reads them.
PROPERTY_FIELDS = "name,property,value"
#: Columns of ``zpool list``; ``parse.parse_pool_list`` reads them.
POOL_LIST_FIELDS = "name,guid,health"
#: ``zfs send`` dry run with a parsable size estimate (design.md §4).
ESTIMATE_FLAGS = "-nvP"

#: Dataset properties zbackupd reads with ``zfs get``, on its own disk pools only: the
#: daemon reads nothing of the server with ``zfs get`` (what it needs comes from ``zfs
#: list -o``), so ``get`` is not in ``REMOTE_SHAPES`` and the gate refuses every one.
DATASET_PROPERTIES = frozenset(
    {"available", "encryptionroot", "keystatus", "receive_resume_token", "written"}
)
#: Pool properties zbackupd reads with ``zpool get``.
POOL_PROPERTIES = frozenset(
    {
        "allocated",
        "cachefile",
        "capacity",
        "failmode",
        "free",
        "guid",
        "health",
        "multihost",
        "name",
        "readonly",
        "size",
    }
)
_POOL_FEATURE_RE = re.compile(r"feature@[a-z_]{1,64}")
_RESUME_TOKEN_RE = re.compile(r"[0-9]+-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+")
_MAX_RESUME_TOKEN_LENGTH = 65536
_DEVICE_PATH_RE = re.compile(r"/dev/disk/by-id/[A-Za-z0-9][A-Za-z0-9_.:+@=-]*")
#: What a pool is imported from: a by-id path, or zbackupd's own mapping over one
#: (``devmap``: ``/dev/mapper/zbackupd-<label>``).
_IMPORT_PATH_RE = re.compile(
    _DEVICE_PATH_RE.pattern + r"|/dev/mapper/zbackupd-[A-Za-z0-9][A-Za-z0-9._+-]*"
)


class InvalidArgument(PermanentError):
    """A builder got something that is not a name but is still unusable.

    ``what`` names the argument, ``value`` is the refused value (never a secret:
    builders take none), ``reason`` the rule it broke.
    """

    def __init__(self, what: str, value: object, reason: str) -> None:
        self.what = what
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {what} {value!r}: {reason}")


# -- the remote grammar --------------------------------------------------------------


class Slot(Enum):
    """A place in a remote argv that holds a value rather than a fixed word."""

    DATASET = "dataset"
    SNAPSHOT = "snapshot"
    OWN_SNAPSHOT = "own run snapshot"
    OWN_SNAPSHOT_SET = "own run snapshots of one dataset (ds@a,b,...)"
    INCREMENTAL_SOURCE = "snapshot or bookmark"
    OWN_BOOKMARK = "own cursor bookmark"
    OWN_HOLD_TAG = "own hold tag"
    RESUME_TOKEN = "receive resume token"  # noqa: S105 -- a slot label, not a secret


class Choice(Record):
    """A place that holds one of a few fixed words."""

    __slots__ = ("options",)
    options: tuple[str, ...]

    def __init__(self, options: tuple[str, ...]) -> None:
        self._init(options=options)


Token = str | Choice | Slot


class RemoteKind(Enum):
    """What a remote command does; the gate logs it and may rate-limit by it."""

    LIST = "list"
    HOLDS = "holds"
    SNAPSHOT = "snapshot"
    HOLD = "hold"
    RELEASE = "release"
    BOOKMARK = "bookmark"
    DESTROY = "destroy"
    SEND = "send"
    ESTIMATE = "estimate"


class RemoteShape(Record):
    """One accepted argv shape: fixed words, choices and value slots, in order.

    ``repeat_last``: the last slot may occur one or more times.
    ``same_dataset``: every name in the argv must belong to one dataset (a bookmark
    of its own snapshot; an incremental send within one dataset).
    """

    __slots__ = ("kind", "name", "repeat_last", "same_dataset", "tokens")
    name: str
    kind: RemoteKind
    tokens: tuple[Token, ...]
    repeat_last: bool
    same_dataset: bool

    def __init__(
        self,
        name: str,
        kind: RemoteKind,
        tokens: tuple[Token, ...],
        repeat_last: bool = False,
        same_dataset: bool = False,
    ) -> None:
        self._init(
            name=name, kind=kind, tokens=tokens, repeat_last=repeat_last, same_dataset=same_dataset
        )


def _send_shapes() -> tuple[RemoteShape, ...]:
    shapes: list[RemoteShape] = []
    for estimate in (False, True):
        kind = RemoteKind.ESTIMATE if estimate else RemoteKind.SEND
        head: tuple[Token, ...] = (ZFS, "send", *((ESTIMATE_FLAGS,) if estimate else ()))
        suffix = "_estimate" if estimate else ""
        for mode in Encryption:
            flags = send_mode_flags(mode)
            shapes += [
                RemoteShape(
                    f"send_full_{mode.value}{suffix}", kind, (*head, *flags, Slot.SNAPSHOT)
                ),
                RemoteShape(
                    f"send_incremental_{mode.value}{suffix}",
                    kind,
                    (*head, *flags, "-i", Slot.INCREMENTAL_SOURCE, Slot.SNAPSHOT),
                    same_dataset=True,
                ),
                RemoteShape(
                    f"send_intermediates_{mode.value}{suffix}",
                    kind,
                    (*head, *flags, "-I", Slot.SNAPSHOT, Slot.SNAPSHOT),
                    same_dataset=True,
                ),
            ]
        shapes.append(RemoteShape(f"send_resume{suffix}", kind, (*head, "-t", Slot.RESUME_TOKEN)))
    return tuple(shapes)


def send_mode_flags(mode: Encryption) -> Argv:
    """How a dataset is sent (design.md §4).

    Encrypted sources go raw (``-w``): the disk never sees their plaintext. Plain
    sources go ``-L -c`` and NEVER ``-w`` or ``-e``: on an unencrypted source ``-w``
    means ``-Lec``, and an embedded-data stream cannot be received into the encrypted
    disk pool ("incompatible embedded data stream feature with encrypted receive").
    """
    if mode is Encryption.ENCRYPTED:
        return ("-w",)
    if mode is Encryption.PLAIN:
        return ("-L", "-c")
    raise InvalidArgument("send mode", mode, "not an Encryption")


_VERSION_TYPES = Choice(("snapshot", "bookmark", "snapshot,bookmark"))
_LIST_HEAD: tuple[Token, ...] = (ZFS, "list", "-H", "-p", "-t", _VERSION_TYPES)
_LIST_TAIL: tuple[Token, ...] = ("-o", VERSION_LIST_FIELDS, "-s", "createtxg")

#: Every argv shape zbackupd may run on the backup server. The builders render from
#: it and the gate matches against it: keep them one.
REMOTE_SHAPES: tuple[RemoteShape, ...] = (
    RemoteShape(
        "list_versions",
        RemoteKind.LIST,
        (*_LIST_HEAD, *_LIST_TAIL, "-d", "1", Slot.DATASET),
        repeat_last=True,
    ),
    RemoteShape(
        "list_versions_recursive",
        RemoteKind.LIST,
        (*_LIST_HEAD, *_LIST_TAIL, "-r", Slot.DATASET),
        repeat_last=True,
    ),
    RemoteShape(
        "list_datasets",
        RemoteKind.LIST,
        (
            ZFS,
            "list",
            "-H",
            "-p",
            "-t",
            "filesystem,volume",
            "-o",
            DATASET_LIST_FIELDS,
            "-r",
            Slot.DATASET,
        ),
        repeat_last=True,
    ),
    RemoteShape(
        "holds", RemoteKind.HOLDS, (ZFS, "holds", "-H", "-p", Slot.SNAPSHOT), repeat_last=True
    ),
    RemoteShape(
        "snapshot", RemoteKind.SNAPSHOT, (ZFS, "snapshot", Slot.OWN_SNAPSHOT), repeat_last=True
    ),
    RemoteShape(
        "snapshot_recursive",
        RemoteKind.SNAPSHOT,
        (ZFS, "snapshot", "-r", Slot.OWN_SNAPSHOT),
        repeat_last=True,
    ),
    RemoteShape(
        "hold", RemoteKind.HOLD, (ZFS, "hold", Slot.OWN_HOLD_TAG, Slot.SNAPSHOT), repeat_last=True
    ),
    RemoteShape(
        "release",
        RemoteKind.RELEASE,
        (ZFS, "release", Slot.OWN_HOLD_TAG, Slot.SNAPSHOT),
        repeat_last=True,
    ),
    RemoteShape(
        "bookmark",
        RemoteKind.BOOKMARK,
        (ZFS, "bookmark", Slot.SNAPSHOT, Slot.OWN_BOOKMARK),
        same_dataset=True,
    ),
    RemoteShape("destroy_snapshots", RemoteKind.DESTROY, (ZFS, "destroy", Slot.OWN_SNAPSHOT_SET)),
    RemoteShape("destroy_bookmark", RemoteKind.DESTROY, (ZFS, "destroy", Slot.OWN_BOOKMARK)),
    *_send_shapes(),
)
_SHAPES_BY_NAME = {shape.name: shape for shape in REMOTE_SHAPES}


class _Policy(Record):
    """How strictly slots are checked: syntax only (builders) or also roots and ownership
    (the gate, which knows the configured roots and prefix)."""

    __slots__ = ("prefix", "roots")
    roots: tuple[str, ...] | None
    prefix: str

    def __init__(
        self, roots: tuple[str, ...] | None = None, prefix: str = names.DEFAULT_PREFIX
    ) -> None:
        self._init(roots=roots, prefix=prefix)

    def require_within(self, dataset: str) -> None:
        if self.roots is not None and not names.within_roots(dataset, self.roots):
            raise InvalidArgument("dataset", dataset, "outside the configured roots")

    def require_own(self, kind: str, name: str, own: bool) -> None:
        if self.roots is not None and not own:
            raise InvalidArgument(kind, name, f"not one of zbackupd's own ({self.prefix}_...)")


def _check_dataset(value: str, policy: _Policy) -> tuple[str, ...]:
    names.validate_dataset_name(value)
    policy.require_within(value)
    return (value,)


def _check_snapshot(value: str, policy: _Policy) -> tuple[str, ...]:
    dataset, _ = names.split_snapshot_name(value)
    policy.require_within(dataset)
    return (dataset,)


def _check_own_snapshot(value: str, policy: _Policy) -> tuple[str, ...]:
    dataset, short = names.split_snapshot_name(value)
    policy.require_within(dataset)
    policy.require_own("snapshot", value, names.is_own_snapshot(short, policy.prefix))
    return (dataset,)


def _check_own_snapshot_set(value: str, policy: _Policy) -> tuple[str, ...]:
    dataset, _, shorts = value.partition("@")
    if not shorts:
        raise InvalidName("snapshot", value, "needs '@' and at least one snapshot name")
    for short in shorts.split(","):
        names.validate_snapshot_name(f"{dataset}@{short}")
        policy.require_own("snapshot", short, names.is_own_snapshot(short, policy.prefix))
    policy.require_within(dataset)
    return (dataset,)


def _check_incremental_source(value: str, policy: _Policy) -> tuple[str, ...]:
    if "#" in value:
        dataset, _ = names.split_bookmark_name(value)
    else:
        dataset, _ = names.split_snapshot_name(value)
    policy.require_within(dataset)
    return (dataset,)


def _check_own_bookmark(value: str, policy: _Policy) -> tuple[str, ...]:
    dataset, short = names.split_bookmark_name(value)
    policy.require_within(dataset)
    policy.require_own("bookmark", value, names.is_own_bookmark(short, policy.prefix))
    return (dataset,)


def _check_own_hold_tag(value: str, policy: _Policy) -> tuple[str, ...]:
    names.validate_hold_tag(value)
    policy.require_own("hold tag", value, names.is_own_hold_tag(value, policy.prefix))
    return ()


def _check_resume_token(value: str, policy: _Policy) -> tuple[str, ...]:
    dataset, _ = names.split_snapshot_name(decode_resume_token(value).toname)
    policy.require_within(dataset)
    return (dataset,)


#: Each slot's check: validates the value (and, for the gate, roots and ownership) and
#: returns the datasets it names, for ``same_dataset``.
_SLOT_CHECKS: dict[Slot, Callable[[str, _Policy], tuple[str, ...]]] = {
    Slot.DATASET: _check_dataset,
    Slot.SNAPSHOT: _check_snapshot,
    Slot.OWN_SNAPSHOT: _check_own_snapshot,
    Slot.OWN_SNAPSHOT_SET: _check_own_snapshot_set,
    Slot.INCREMENTAL_SOURCE: _check_incremental_source,
    Slot.OWN_BOOKMARK: _check_own_bookmark,
    Slot.OWN_HOLD_TAG: _check_own_hold_tag,
    Slot.RESUME_TOKEN: _check_resume_token,
}


def _check_properties(properties: Sequence[str], allowed: frozenset[str]) -> None:
    if not properties:
        raise InvalidArgument("property list", properties, "empty")
    for prop in properties:
        is_pool_feature = allowed is POOL_PROPERTIES and _POOL_FEATURE_RE.fullmatch(prop)
        if prop not in allowed and not is_pool_feature:
            raise InvalidArgument("property", prop, "not one zbackupd reads")


def _render(shape_name: str, *values: str | Sequence[str]) -> Argv:
    """Fill a shape's choices and slots with ``values`` (the last one a sequence when the
    shape repeats), validating each the way the gate will (syntax part)."""
    shape = _SHAPES_BY_NAME[shape_name]
    argv: list[str] = []
    pending = list(values)
    datasets: list[str] = []
    for position, token in enumerate(shape.tokens):
        if isinstance(token, str):
            argv.append(token)
            continue
        value = pending.pop(0)
        repeated = shape.repeat_last and position == len(shape.tokens) - 1
        items = [value] if isinstance(value, str) else list(value)
        if not repeated and len(items) != 1:
            raise InvalidArgument("argument", value, "exactly one value expected")
        if not items:
            raise InvalidArgument(_token_label(token), value, "at least one value expected")
        for item in items:
            datasets += _check_token(token, item, _Policy())
            argv.append(item)
    if pending:
        raise InvalidArgument("arguments", pending, "more values than the shape has places")
    if shape.same_dataset and len(set(datasets)) > 1:
        raise InvalidArgument("names", tuple(datasets), "must all belong to one dataset")
    return tuple(argv)


def _token_label(token: Choice | Slot) -> str:
    return token.value if isinstance(token, Slot) else "choice"


def _check_token(token: Choice | Slot, value: str, policy: _Policy) -> tuple[str, ...]:
    if isinstance(token, Choice):
        if value not in token.options:
            raise InvalidArgument("word", value, f"expected one of {token.options}")
        return ()
    return _SLOT_CHECKS[token](value, policy)


# -- resume tokens ---------------------------------------------------------------------
#
# ``zfs send -t <token>`` names no dataset in argv: the snapshot is inside the token.
# The gate must see it to keep sends within the roots, so the token is decoded here,
# as libzfs does (lib/libzfs/libzfs_sendrecv.c, zfs_send_resume_token_to_nvlist):
# "<version>-<fletcher4 word 0 of the payload>-<unpacked length>-<hex zlib payload>",
# the payload a packed nvlist in native encoding (fnvlist_pack, module/nvpair/nvpair.c).

_NV_TYPE_BOOLEAN = 1
_NV_TYPE_UINT64 = 8
_NV_TYPE_STRING = 9
_NVLIST_HEADER = 12  # 4-byte stream header, nvl_version, nvl_nvflag
_NVPAIR_HEADER = 16  # nvp_size, nvp_name_sz, nvp_reserve, nvp_value_elem, nvp_type
_MAX_UNPACKED_TOKEN = 1 << 20


class ResumeTokenContents(Record):
    """What a receive resume token says it continues: which snapshot, from where.

    zfs resolves a token by its GUIDs (libzfs ``guid_to_name`` walks up from ``toname``'s
    dataset to the pool), not by ``toname``: the gate checks them against the server.
    ``saved``: a token of a saved partial receive (``savedok``), which libzfs resolves by
    name instead. ``redaction``: the names of any redaction fields (``redact_snaps``,
    ``book_redact_snaps``), which pull in further snapshots by GUID.
    """

    __slots__ = ("fromguid", "raw", "redaction", "saved", "toguid", "toname")
    toname: str
    toguid: int
    fromguid: int | None
    raw: bool
    saved: bool
    redaction: tuple[str, ...]

    def __init__(
        self,
        toname: str,
        toguid: int,
        *,
        fromguid: int | None,
        raw: bool,
        saved: bool = False,
        redaction: tuple[str, ...] = (),
    ) -> None:
        self._init(
            toname=toname,
            toguid=toguid,
            fromguid=fromguid,
            raw=raw,
            saved=saved,
            redaction=redaction,
        )


def _bad_token(token: str, reason: str) -> InvalidArgument:
    return InvalidArgument("resume token", token[:80], reason)


def decode_resume_token(token: str) -> ResumeTokenContents:
    """Decode ``token`` (checksum, zlib, native nvlist) or raise ``InvalidArgument``."""
    import struct  # noqa: PLC0415 -- only tokens need them: the gate imports them lazily
    import zlib  # noqa: PLC0415 -- (see above)
    if len(token) > _MAX_RESUME_TOKEN_LENGTH or not _RESUME_TOKEN_RE.fullmatch(token):
        raise _bad_token(token, "not <version>-<hex>-<hex>-<hex>")
    version, checksum, unpacked_length, payload_hex = token.split("-")
    if int(version) != 1:
        raise _bad_token(token, f"unsupported version {version}")
    if len(payload_hex) % 2:
        raise _bad_token(token, "odd-length payload")
    payload = bytes.fromhex(payload_hex)
    usable = len(payload) // 4 * 4
    word0 = sum(struct.unpack(f"<{usable // 4}I", payload[:usable])) % 2**64
    if word0 != int(checksum, 16):
        raise _bad_token(token, "checksum mismatch")
    expected = int(unpacked_length, 16)
    if expected > _MAX_UNPACKED_TOKEN:
        raise _bad_token(token, "unpacked payload too large")
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(payload, expected + 1)
    except zlib.error as error:
        raise _bad_token(token, f"payload does not inflate: {error}") from None
    if len(packed) != expected:
        raise _bad_token(token, "unpacked length differs from the header")
    fields, seen = _unpack_native_nvlist(packed, token)
    toname = fields.get("toname")
    toguid = fields.get("toguid")
    fromguid = fields.get("fromguid")
    if not isinstance(toname, str) or not isinstance(toguid, int):
        raise _bad_token(token, "no toname/toguid")
    names.validate_snapshot_name(toname)
    return ResumeTokenContents(
        toname=toname,
        toguid=toguid,
        # libzfs treats a missing fromguid and a zero one alike: a full send.
        fromguid=fromguid if isinstance(fromguid, int) and fromguid else None,
        raw="rawok" in seen,
        saved="savedok" in seen,
        redaction=tuple(name for name in seen if "redact" in name),
    )


def _unpack_native_nvlist(
    packed: bytes, token: str
) -> tuple[dict[str, str | int | bool], tuple[str, ...]]:
    """The flat name → value pairs of a natively packed nvlist (strings, uint64s and
    booleans; other types are skipped by their recorded size), and the names of every
    pair, whatever its type."""
    import struct  # noqa: PLC0415 -- only tokens need it: the gate imports it lazily

    if len(packed) < _NVLIST_HEADER or packed[0] != 0 or packed[1] not in (0, 1):
        raise _bad_token(token, "not a natively encoded nvlist")
    order = "<" if packed[1] == 1 else ">"
    offset = _NVLIST_HEADER
    fields: dict[str, str | int | bool] = {}
    seen: list[str] = []
    while True:
        if offset + 4 > len(packed):
            raise _bad_token(token, "nvlist truncated")
        (size,) = struct.unpack_from(f"{order}i", packed, offset)
        if size == 0:
            return fields, tuple(seen)
        if size < _NVPAIR_HEADER or offset + size > len(packed):
            raise _bad_token(token, "nvpair size out of bounds")
        _, name_size, _, _, kind = struct.unpack_from(f"{order}ihhii", packed, offset)
        if name_size < 1 or _NVPAIR_HEADER + name_size > size:
            raise _bad_token(token, "nvpair name out of bounds")
        pair = packed[offset : offset + size]
        name = pair[_NVPAIR_HEADER : _NVPAIR_HEADER + name_size - 1].decode("ascii", "replace")
        seen.append(name)
        value_at = (_NVPAIR_HEADER + name_size + 7) // 8 * 8
        if kind == _NV_TYPE_BOOLEAN:
            fields[name] = True
        elif kind == _NV_TYPE_UINT64 and value_at + 8 <= size:
            (fields[name],) = struct.unpack_from(f"{order}Q", pair, value_at)
        elif kind == _NV_TYPE_STRING:
            end = pair.find(b"\0", value_at)
            if end < 0:
                raise _bad_token(token, "unterminated string")
            fields[name] = pair[value_at:end].decode("utf-8", "replace")
        offset += size


# -- remote builders (rendered from REMOTE_SHAPES) -------------------------------------


def _one_or_more(what: str, items: Iterable[str]) -> tuple[str, ...]:
    result = (items,) if isinstance(items, str) else tuple(items)
    if not result:
        raise InvalidArgument(what, result, "at least one expected")
    return result


def _list_versions(types: str, datasets: Iterable[str], recursive: bool) -> Argv:
    shape = "list_versions_recursive" if recursive else "list_versions"
    return _render(shape, types, _one_or_more("datasets", datasets))


def list_snapshots(datasets: Iterable[str], *, recursive: bool = False) -> Argv:
    """``zfs list -t snapshot`` of ``datasets`` (``-d 1``) or their subtrees (``-r``),
    ordered by createtxg, parsable."""
    return _list_versions("snapshot", datasets, recursive)


def list_bookmarks(datasets: Iterable[str], *, recursive: bool = False) -> Argv:
    """``zfs list -t bookmark``, same columns and order as ``list_snapshots``."""
    return _list_versions("bookmark", datasets, recursive)


def list_snapshots_and_bookmarks(datasets: Iterable[str], *, recursive: bool = False) -> Argv:
    """Both in one call (one SSH round trip per source); ``@`` vs ``#`` tells them apart."""
    return _list_versions("snapshot,bookmark", datasets, recursive)


def list_datasets(roots: Iterable[str]) -> Argv:
    """Every filesystem/volume under ``roots`` with its type (a volume is received
    differently), its encryption (which picks the send mode per dataset) and what was
    written since its newest snapshot (nothing: no new run snapshot needed)."""
    return _render("list_datasets", _one_or_more("roots", roots))


def get_properties(datasets: Iterable[str], properties: Iterable[str]) -> Argv:
    """``zfs get -H -p -o name,property,value <props> <datasets>``: local only (the disk
    pool); the gate refuses every ``zfs get``."""
    props = _one_or_more("properties", properties)
    _check_properties(props, DATASET_PROPERTIES)
    targets = [names.validate_dataset_name(name) for name in _one_or_more("datasets", datasets)]
    return (ZFS, "get", "-H", "-p", "-o", PROPERTY_FIELDS, ",".join(props), *targets)


def holds(snapshots: Iterable[str]) -> Argv:
    """``zfs holds -H -p`` of ``snapshots``."""
    return _render("holds", _one_or_more("snapshots", snapshots))


def snapshot(snapshots: Iterable[str], *, recursive: bool = False) -> Argv:
    """One atomic ``zfs snapshot`` of all ``snapshots`` (or ``-r``: each subtree)."""
    shape = "snapshot_recursive" if recursive else "snapshot"
    return _render(shape, _one_or_more("snapshots", snapshots))


def hold(tag: str, snapshots: Iterable[str]) -> Argv:
    """``zfs hold <tag> <snapshots>``: pin snapshots while a transfer depends on them."""
    return _render("hold", tag, _one_or_more("snapshots", snapshots))


def release(tag: str, snapshots: Iterable[str]) -> Argv:
    """``zfs release <tag> <snapshots>``."""
    return _render("release", tag, _one_or_more("snapshots", snapshots))


def bookmark(snapshot_name: str, bookmark_name: str) -> Argv:
    """``zfs bookmark ds@snap ds#mark`` (both in the same dataset)."""
    return _render("bookmark", snapshot_name, bookmark_name)


def destroy_snapshots(dataset: str, short_names: Iterable[str]) -> Argv:
    """``zfs destroy ds@a,b,c``: named snapshots of one dataset, never ``-r``/``-R``."""
    shorts = _one_or_more("snapshot names", short_names)
    for short in shorts:
        names.validate_short_name(short)
    names.validate_dataset_name(dataset)
    return _render("destroy_snapshots", f"{dataset}@{','.join(shorts)}")


def destroy_bookmark(bookmark_name: str) -> Argv:
    """``zfs destroy ds#mark`` (moving a cursor: create the new name, then destroy the old)."""
    return _render("destroy_bookmark", bookmark_name)


def send_full(snapshot_name: str, mode: Encryption, *, estimate: bool = False) -> Argv:
    """A full stream of ``snapshot_name``; ``estimate`` = dry run printing ``size``."""
    suffix = "_estimate" if estimate else ""
    return _render(f"send_full_{mode.value}{suffix}", snapshot_name)


def send_incremental(
    source: str,
    snapshot_name: str,
    mode: Encryption,
    *,
    intermediates: bool = False,
    estimate: bool = False,
) -> Argv:
    """An incremental stream ``source`` → ``snapshot_name`` in one dataset.

    ``source`` is a snapshot or a bookmark (``ds#mark``); ``intermediates`` (``-I``)
    also sends the snapshots in between and cannot start from a bookmark.
    """
    suffix = "_estimate" if estimate else ""
    if intermediates:
        if "#" in source:
            raise InvalidArgument("incremental source", source, "-I cannot start from a bookmark")
        return _render(f"send_intermediates_{mode.value}{suffix}", source, snapshot_name)
    return _render(f"send_incremental_{mode.value}{suffix}", source, snapshot_name)


def send_resume(token: str, *, estimate: bool = False) -> Argv:
    """``zfs send -t <token>``: the stream's flags (raw or not) come from the token."""
    return _render("send_resume_estimate" if estimate else "send_resume", token)


# -- the gate's matcher ---------------------------------------------------------------


class RemoteCommand(Record):
    """An argv the gate accepts: which shape, what kind, which datasets it touches."""

    __slots__ = ("argv", "datasets", "kind", "shape")
    shape: str
    kind: RemoteKind
    argv: Argv
    datasets: tuple[str, ...]

    def __init__(
        self, shape: str, kind: RemoteKind, argv: Argv, datasets: tuple[str, ...]
    ) -> None:
        self._init(shape=shape, kind=kind, argv=argv, datasets=datasets)


class Refusal(Record):
    """Why the gate refuses an argv (logged on the server, sent back on stderr)."""

    __slots__ = ("argv", "reason")
    argv: Argv
    reason: str

    def __init__(self, argv: Argv, reason: str) -> None:
        self._init(argv=argv, reason=reason)


def send_is_raw(command: RemoteCommand) -> bool | None:
    """For a send or estimate: True if raw (``-w``), False if it sends plaintext (``-L -c``),
    None if a resume token decides (``-t``). None for anything that is not a send."""
    tokens = _SHAPES_BY_NAME[command.shape].tokens
    if command.kind not in (RemoteKind.SEND, RemoteKind.ESTIMATE) or Slot.RESUME_TOKEN in tokens:
        return None
    return "-w" in tokens


def match_remote_argv(
    argv: Sequence[str], roots: Iterable[str], *, prefix: str = names.DEFAULT_PREFIX
) -> RemoteCommand | Refusal:
    """Accept ``argv`` only if it fits a ``REMOTE_SHAPES`` entry with every dataset
    within ``roots`` and every name it creates or destroys one of zbackupd's own."""
    argv = tuple(argv)
    root_list = tuple(roots)
    for root in root_list:
        names.validate_dataset_name(root)
    policy = _Policy(roots=root_list, prefix=names.validate_prefix(prefix))
    closest: str | None = None
    for shape in REMOTE_SHAPES:
        outcome = _match_shape(shape, argv, policy)
        if isinstance(outcome, RemoteCommand):
            return outcome
        if outcome is not None and closest is None:
            closest = f"{shape.name}: {outcome}"
    return Refusal(argv, closest or "not a command zbackupd issues")


def _match_shape(shape: RemoteShape, argv: Argv, policy: _Policy) -> RemoteCommand | str | None:
    """A ``RemoteCommand`` on a match; the reason when the fixed words fit but a value
    does not; None when the shape is not this command at all."""
    count = len(shape.tokens)
    if len(argv) < count or (len(argv) > count and not shape.repeat_last):
        return None
    for token, word in zip(shape.tokens, argv, strict=False):
        if isinstance(token, str) and token != word:
            return None
    datasets: list[str] = []
    try:
        for position, token in enumerate(shape.tokens):
            if isinstance(token, str):
                continue
            last = position == count - 1
            values = argv[position:] if (last and shape.repeat_last) else (argv[position],)
            for value in values:
                datasets += _check_token(token, value, policy)
    except (InvalidName, InvalidArgument) as error:
        return str(error)
    if shape.same_dataset and len(set(datasets)) > 1:
        return "names must all belong to one dataset"
    return RemoteCommand(shape.name, shape.kind, argv, tuple(dict.fromkeys(datasets)))


# -- local-only builders ---------------------------------------------------------------


class MountpointPolicy(Enum):
    """How received datasets get their mountpoint: never mounted over live paths."""

    NONE = "none"  # -o mountpoint=none: cannot be mounted without an explicit set
    EXCLUDE = "exclude"  # -x mountpoint: inherit from the disk pool's tree


def receive(
    target: str,
    *,
    mountpoint: MountpointPolicy = MountpointPolicy.NONE,
    force_rollback: bool = False,
    volume: bool = False,
) -> Argv:
    """``zfs receive -s -u -o readonly=on -o canmount=noauto ... <target>``.

    ``-s`` keeps a resume token when the stream is cut; ``-u`` mounts nothing.
    ``-F`` (rolls back, may destroy snapshots) only when ``force_rollback`` is given
    explicitly, by policy. A ``volume`` has no mountpoint or canmount (zfs refuses them
    there): it gets ``volmode=none`` instead, so no ``/dev/zd*`` node exposes it on this
    machine while the key is loaded.
    """
    names.validate_dataset_name(target)
    if volume:
        mount_args: Argv = ("-o", "volmode=none")
    elif mountpoint is MountpointPolicy.NONE:
        mount_args = ("-o", "canmount=noauto", "-o", "mountpoint=none")
    else:
        mount_args = ("-o", "canmount=noauto", "-x", "mountpoint")
    force = ("-F",) if force_rollback else ()
    return (
        ZFS,
        "receive",
        "-s",
        "-u",
        *force,
        "-o",
        "readonly=on",
        *mount_args,
        target,
    )


def create_placeholder(dataset: str) -> Argv:
    """``zfs create -o canmount=off -o mountpoint=none <dataset>``: an empty parent for
    received datasets, never mounted, encrypted under its parent's (the pool's) key.
    One level only: ``-p`` would create and mount intermediate parents with defaults."""
    names.validate_dataset_name(dataset)
    if "/" not in dataset:
        raise InvalidArgument("dataset", dataset, "a pool's root dataset always exists")
    return (ZFS, "create", "-o", "canmount=off", "-o", "mountpoint=none", dataset)


def receive_abort(target: str) -> Argv:
    """``zfs receive -A <target>``: discard a partial receive's saved state."""
    return (ZFS, "receive", "-A", names.validate_dataset_name(target))


def _pool_guid(guid: int) -> str:
    if isinstance(guid, bool) or not isinstance(guid, int) or not 0 < guid < 2**64:
        raise InvalidArgument("pool guid", guid, "must be an integer in 1..2**64-1")
    return str(guid)


#: How ``zbackupd init-disk`` makes a backup pool: encrypted under the in-memory key
#: (raw, from stdin), compressed, nothing ever mounted on the backup machine.
BACKUP_POOL_OPTIONS: tuple[tuple[str, str], ...] = (
    ("compression", "zstd"),
    ("xattr", "sa"),
    ("acltype", "posixacl"),
    ("atime", "off"),
    ("encryption", "on"),
    ("keyformat", "raw"),
    ("keylocation", "prompt"),
    ("mountpoint", "none"),
    ("canmount", "off"),
)


def zpool_create(pool: str, device: str, *, force: bool = False) -> Argv:
    """``zpool create -o ashift=12 -O … <pool> <by-id disk>``; the key comes on stdin.

    ``force`` (``-f``) only when the admin said ``--force`` to overwrite a disk that
    holds a pool or partitions.
    """
    if not _DEVICE_PATH_RE.fullmatch(device) or "/../" in device or device.endswith("/.."):
        raise InvalidArgument("device", device, "must be a /dev/disk/by-id/ path")
    options = [word for name, value in BACKUP_POOL_OPTIONS for word in ("-O", f"{name}={value}")]
    return (
        ZPOOL,
        "create",
        *(("-f",) if force else ()),
        "-o",
        "ashift=12",
        "-o",
        "cachefile=none",
        *options,
        names.validate_pool_name(pool),
        device,
    )


def _import_device(device: str) -> str:
    if not _IMPORT_PATH_RE.fullmatch(device) or "/../" in device or device.endswith("/.."):
        raise InvalidArgument(
            "device", device, "must be a /dev/disk/by-id/ path or /dev/mapper/zbackupd-*"
        )
    return device


def zpool_import(device: str, pool_guid: int, *, temp_name: str | None = None) -> Argv:
    """``zpool import -d <device> -N -o cachefile=none [-t] <guid> [tempname]``.

    By GUID (the identity), from a stable path: zbackupd's device-mapper mapping over the
    disk (``devmap``; what lets a pool suspended by a pull resume on the re-plugged disk)
    or a ``/dev/disk/by-id/`` path (never ``/dev/sdX``, which changes on a re-plug).
    ``-N`` mounts nothing, no cachefile, and never ``-f``. With ``temp_name`` the pool is
    imported under that name with ``-t``: the name lasts until the export and is never
    written to the disk (without ``-t`` a new name is a rename, kept on the disk), so that
    two disks whose pools share a name can be imported at once.
    """
    guid = _pool_guid(pool_guid)
    tail = (guid,) if temp_name is None else ("-t", guid, names.validate_pool_name(temp_name))
    return (ZPOOL, "import", "-d", _import_device(device), "-N", "-o", "cachefile=none", *tail)


def zpool_import_listing(device: str) -> Argv:
    """``zpool import -d <device>``: the pools offered for import there, each with its
    name as written on the disk and its GUID (``parse.parse_import_listing``); imports
    nothing."""
    return (ZPOOL, "import", "-d", _import_device(device))


def zpool_export(pool: str) -> Argv:
    """``zpool export <pool>`` (never ``-f``)."""
    return (ZPOOL, "export", names.validate_pool_name(pool))


def zpool_reopen(pool: str) -> Argv:
    """``zpool reopen <pool>``: reopen every vdev by its path (a re-plugged disk's by-id
    link now points at a new ``/dev/sdX``), letting writes stuck on the old one land."""
    return (ZPOOL, "reopen", names.validate_pool_name(pool))


def zpool_clear(pool: str) -> Argv:
    """``zpool clear <pool>``: resume a suspended pool once its disk is back."""
    return (ZPOOL, "clear", names.validate_pool_name(pool))


def zpool_list(pools: Iterable[str] = ()) -> Argv:
    """``zpool list -H -p -o name,guid,health [pools]`` (no pools: all imported)."""
    return (
        ZPOOL,
        "list",
        "-H",
        "-p",
        "-o",
        POOL_LIST_FIELDS,
        *(names.validate_pool_name(pool) for pool in pools),
    )


def zpool_status_paths(pool: str) -> Argv:
    """``zpool status -P <pool>``: the vdevs with their full device paths."""
    return (ZPOOL, "status", "-P", names.validate_pool_name(pool))


def zpool_get(pool: str, properties: Iterable[str]) -> Argv:
    """``zpool get -H -p -o name,property,value <props> <pool>``."""
    props = _one_or_more("properties", properties)
    _check_properties(props, POOL_PROPERTIES)
    return (
        ZPOOL,
        "get",
        "-H",
        "-p",
        "-o",
        PROPERTY_FIELDS,
        ",".join(props),
        names.validate_pool_name(pool),
    )


def load_key(encryption_root: str, *, check_only: bool = False) -> Argv:
    """``zfs load-key -L prompt [-n] <encroot>``: the key comes on stdin, never argv.

    ``check_only`` (``-n``) verifies the key without loading it.
    """
    check = ("-n",) if check_only else ()
    return (ZFS, "load-key", "-L", "prompt", *check, names.validate_dataset_name(encryption_root))


def unload_key(encryption_root: str) -> Argv:
    """``zfs unload-key <encroot>`` before export: the key leaves the kernel."""
    return (ZFS, "unload-key", names.validate_dataset_name(encryption_root))
