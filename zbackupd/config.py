"""The daemon's configuration: ``/etc/zbackupd/zbackupd.toml`` as frozen, typed models.

Loading is pure apart from reading the file: ``parse_config`` turns TOML text into a
``Config`` or raises one ``ConfigError`` that lists *every* problem, each naming the file
and the dotted key, so an admin fixes the whole file in one pass instead of one error per
restart. Field shapes (types, names, ranges) are checked by pydantic; relations between
fields (duplicates, overlaps, references) by ``_semantic_problems``, which also runs on the
entries that did validate when others did not.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import re
import struct
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from zbackupd.core.model import DiskIdentity
from zbackupd.errors import PermanentError
from zbackupd.zfs import names

DEFAULT_CONFIG_PATH: Final = Path("/etc/zbackupd/zbackupd.toml")

# SSH transport defaults (design.md §5): AES-GCM before chacha20, which is about half as
# fast here; a 16 MiB window covers a WAN bandwidth-delay product.
DEFAULT_CIPHERS: Final = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
SUPPORTED_CIPHERS: Final = frozenset({*DEFAULT_CIPHERS, "aes128-ctr", "aes192-ctr", "aes256-ctr"})
DEFAULT_WINDOW_BYTES: Final = 16 * 1024 * 1024
MIN_WINDOW_BYTES: Final = 64 * 1024
MAX_WINDOW_BYTES: Final = 2**32 - 1  # the SSH window is a uint32
DEFAULT_KEEPALIVE_INTERVAL: Final = 15.0
DEFAULT_SNAPSHOT_PREFIX: Final = names.DEFAULT_PREFIX
DEFAULT_KEEP_OWN_SNAPSHOTS: Final = 1

MAX_UINT64: Final = 2**64 - 1

SnapshotMode = Literal["create", "reuse"]
_M = typing.TypeVar("_M", bound=BaseModel)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration. ``key`` is dotted (``disks[1].serial``);
    empty when the problem concerns the whole file (unreadable, TOML syntax)."""

    key: str
    message: str


class ConfigError(PermanentError):
    """The configuration cannot be used. ``str()`` lists every problem, one per line,
    each starting with the file name and the dotted key."""

    def __init__(self, path: str, problems: Sequence[ConfigProblem]) -> None:
        self.path = path
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [
            f"{self.path}: {problem.key}: {problem.message}"
            if problem.key
            else f"{self.path}: {problem.message}"
            for problem in self.problems
        ]
        return "\n".join(lines) if lines else f"{self.path}: invalid configuration"

    def __reduce__(self) -> tuple[object, ...]:
        return (ConfigError, (self.path, self.problems))


# --------------------------------------------------------------- name grammars (pure)

_LABEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_GLOB_CHARS = re.compile(r"[A-Za-z0-9_.:*?\[\]!/-]+")
_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>KiB|MiB|GiB)?")
_MAX_HOST_NAME_LENGTH = 253
_SIZE_UNITS = {None: 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _check_dataset_name(value: str) -> str:
    """ZFS's grammar as ``zfs/names.py`` states it, plus no component starting with '-'."""
    try:
        names.validate_dataset_name(value)
    except names.InvalidName as error:
        raise ValueError(f"{value!r} is not a valid ZFS dataset name: {error.reason}") from None
    for component in value.split("/"):
        if component.startswith("-"):
            raise ValueError(f"{value!r}: component {component!r} starts with '-'")
    return value


def _check_pool_name(value: str) -> str:
    try:
        names.validate_pool_name(value)
    except names.InvalidName as error:
        raise ValueError(f"{value!r} is not a valid pool name: {error.reason}") from None
    return value


def _check_snapshot_prefix(value: str) -> str:
    try:
        names.validate_prefix(value)
    except names.InvalidName as error:
        raise ValueError(f"{value!r} cannot start zbackupd's names: {error.reason}") from None
    return value


def _check_label(value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} must be 1-32 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def _check_serial(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if any(c.isspace() for c in value) or not value.isprintable():
        raise ValueError(
            f"{value!r} must be printable with no whitespace "
            "(udev's ID_SERIAL_SHORT shows spaces as '_')"
        )
    if len(value) > names.MAX_NAME_LENGTH:
        raise ValueError(f"is longer than {names.MAX_NAME_LENGTH} characters")
    return value


def _coerce_pool_guid(value: object) -> object:
    """Accept an integer or a string of decimal digits (udev's ID_FS_UUID; TOML integers
    stop at 2**63-1 while GUIDs go to 2**64-1)."""
    if isinstance(value, bool):
        raise ValueError("expected a decimal number, got a boolean")  # noqa: TRY004 -- pydantic reports only ValueError
    if isinstance(value, int):
        guid = value
    elif isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError(f"{value!r} is not a decimal number (zpool get -p guid <pool>)")
        guid = int(value)
    else:
        raise ValueError(  # noqa: TRY004 -- pydantic reports only ValueError
            f"expected an integer or a string of digits, got {_toml_type(value)}"
        )
    if not 0 < guid <= MAX_UINT64:
        raise ValueError(f"{guid} is outside 1..{MAX_UINT64} (a pool GUID is a uint64)")
    return guid


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    name = value.removesuffix(".")
    if (
        len(name) > _MAX_HOST_NAME_LENGTH
        or not name
        or not all(_HOST_LABEL.fullmatch(label) for label in name.split("."))
    ):
        raise ValueError(
            f"{value!r} is neither an IP address nor a host name "
            "(no brackets around IPv6 addresses; the port goes in 'port')"
        )
    return value


def _check_user(value: str) -> str:
    if not _USER.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid user name")
    return value


_HOST_KEY_TYPES: Final = frozenset(
    {
        "ssh-ed25519",
        "ssh-ed448",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_ED25519_BLOB_LENGTH: Final = 4 + len("ssh-ed25519") + 4 + 32


def host_key_problem(line: str) -> str | None:  # noqa: PLR0911 -- one return per check
    """Why ``line`` is not an OpenSSH public key line (``type base64 [comment]``), or None.

    Checks the shape only: the key type is known, the base64 decodes, and the blob inside
    names the same type (a pasted-but-truncated key fails here, not at the first backup).
    """
    fields = line.split()
    if len(fields) < 2:  # noqa: PLR2004 -- a key line is "type base64 [comment]"
        return "expected an OpenSSH public key line like 'ssh-ed25519 AAAA... [comment]'"
    key_type, blob_text = fields[0], fields[1]
    if key_type not in _HOST_KEY_TYPES:
        if blob_text in _HOST_KEY_TYPES:
            return (
                "looks like a known_hosts line: drop the leading host name "
                f"({key_type!r}) and keep 'type key'"
            )
        known = ", ".join(sorted(_HOST_KEY_TYPES))
        return f"unknown key type {key_type!r} (expected one of {known})"
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        return "the key is not valid base64 (truncated or mangled while copying?)"
    if len(blob) < 4:  # noqa: PLR2004 -- the blob starts with a uint32 length
        return "the key is too short to be an SSH public key"
    (type_length,) = struct.unpack(">I", blob[:4])
    embedded_type = blob[4 : 4 + type_length]
    if embedded_type != key_type.encode():
        return (
            f"the key data is not a {key_type} key "
            f"(it says {embedded_type[:40].decode('ascii', 'replace')!r})"
        )
    if key_type == "ssh-ed25519" and len(blob) != _ED25519_BLOB_LENGTH:
        return "the ssh-ed25519 key has the wrong length (truncated while copying?)"
    return None


def _normalize_host_key(value: str) -> str:
    problem = host_key_problem(value)
    if problem:
        raise ValueError(problem)
    key_type, blob_text = value.split()[:2]
    return f"{key_type} {blob_text}"


def _check_glob(value: str) -> str:
    """A dataset glob relative to the root: ``*`` and ``?`` stay within one component."""
    if not value:
        raise ValueError("a pattern must not be empty")
    if not _GLOB_CHARS.fullmatch(value):
        raise ValueError(
            f"{value!r} may only use dataset name characters, '/' and the glob characters * ? [ ] !"
        )
    if value.startswith("/") or value.endswith("/") or "//" in value:
        raise ValueError(f"{value!r} must be relative to the root, without empty components")
    _glob_regex(value)  # raises ValueError on an unclosed '['
    return value


def _check_snapshot_glob(value: str) -> str:
    if not value:
        raise ValueError("a pattern must not be empty")
    if not re.fullmatch(r"[A-Za-z0-9_.:*?\[\]!-]+", value):
        raise ValueError(
            f"{value!r} must match the part after '@' only: snapshot name characters and * ? [ ] !"
        )
    _glob_regex(value)
    return value


def _coerce_byte_size(value: object) -> object:
    """Accept ``16777216`` or ``"16 MiB"`` (KiB/MiB/GiB)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")  # noqa: TRY004 -- pydantic reports only ValueError
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if not match:
            raise ValueError(f'{value!r} is not a size (examples: 16777216, "16 MiB")')
        return int(match["number"]) * _SIZE_UNITS[match["unit"]]
    return value


def _to_absolute_path(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004 -- pydantic reports only ValueError
            f"expected a path string, got {_toml_type(value)}"
        )
    if "\0" in value or not PurePosixPath(value).is_absolute():
        raise ValueError(f"{value!r} must be an absolute path")
    return Path(value)


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{value!r} is listed twice")
        seen.add(value)
    return values


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob: ``*``/``?`` match within one component, ``**`` across."""
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
            continue
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif char == "[":
            end = pattern.find("]", index + 2)
            if end == -1:
                raise ValueError(f"{pattern!r} has an unclosed '['")
            body = pattern[index + 1 : end]
            negate = body.startswith("!")
            members = "".join(
                c if c.isalnum() or c == "-" else re.escape(c) for c in body.removeprefix("!")
            )
            parts.append(f"[{'^' if negate else ''}{members}]")
            index = end + 1
            continue
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts))


def glob_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches the config glob ``pattern`` (see docs/configuration.md)."""
    return _glob_regex(pattern).fullmatch(name) is not None


DatasetName = Annotated[str, AfterValidator(_check_dataset_name)]
PoolName = Annotated[str, AfterValidator(_check_pool_name)]
Label = Annotated[str, AfterValidator(_check_label)]
Serial = Annotated[str, AfterValidator(_check_serial)]
PoolGuid = Annotated[int, BeforeValidator(_coerce_pool_guid)]
HostName = Annotated[str, AfterValidator(_check_host)]
UserName = Annotated[str, AfterValidator(_check_user)]
HostKey = Annotated[str, AfterValidator(_normalize_host_key)]
DatasetGlob = Annotated[str, AfterValidator(_check_glob)]
SnapshotGlob = Annotated[str, AfterValidator(_check_snapshot_glob)]
SnapshotPrefix = Annotated[str, AfterValidator(_check_snapshot_prefix)]
Cipher = Literal[
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
]
AbsolutePath = Annotated[Path, BeforeValidator(_to_absolute_path)]
WindowBytes = Annotated[
    int, BeforeValidator(_coerce_byte_size), Field(ge=MIN_WINDOW_BYTES, le=MAX_WINDOW_BYTES)
]


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    # strict: TOML is typed, so "22" for a port or 1 for a boolean is a mistake to report,
    # not to coerce. Arrays arrive as tuples (see _freeze).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class SourceDataset(_Model):
    """One dataset tree to pull from a source: ``[[sources.datasets]]``."""

    root: DatasetName
    recursive: bool = True
    include: tuple[DatasetGlob, ...] = ()
    exclude: tuple[DatasetGlob, ...] = ()
    snapshots: SnapshotMode = "create"
    snapshot_prefix: SnapshotPrefix = DEFAULT_SNAPSHOT_PREFIX
    reuse_pattern: SnapshotGlob | None = None

    def selects(self, dataset: str) -> bool:
        """Whether the server dataset ``dataset`` is backed up by this entry.

        The root always is; with ``recursive`` its descendants are, filtered by
        ``include`` (if any) and ``exclude`` against the name relative to the root. A
        pattern that matches an ancestor matches its whole subtree.
        """
        if dataset == self.root:
            return True
        if not self.recursive or not dataset.startswith(self.root + "/"):
            return False
        relative = dataset[len(self.root) + 1 :]
        components = relative.split("/")
        lineage = ["/".join(components[: depth + 1]) for depth in range(len(components))]

        def matched(patterns: tuple[str, ...]) -> bool:
            return any(glob_matches(pattern, name) for pattern in patterns for name in lineage)

        if self.include and not matched(self.include):
            return False
        return not matched(self.exclude)

    def reuses_snapshot(self, snapshot_short_name: str) -> bool:
        """In ``reuse`` mode, whether the snapshot (the part after '@') is one to send."""
        return self.reuse_pattern is not None and glob_matches(
            self.reuse_pattern, snapshot_short_name
        )


class Source(_Model):
    """A backup server to pull from over SSH: ``[[sources]]``."""

    name: Label
    host: HostName
    port: int = Field(default=22, ge=1, le=65535)
    user: UserName
    host_key: HostKey
    ciphers: Annotated[tuple[Cipher, ...], Field(min_length=1), AfterValidator(_unique)] = (
        DEFAULT_CIPHERS
    )
    window_bytes: WindowBytes = DEFAULT_WINDOW_BYTES
    keepalive_interval: float = Field(default=DEFAULT_KEEPALIVE_INTERVAL, gt=0, le=3600)
    #: How many of zbackupd's newest own run snapshots stay on this server per dataset
    #: (``create`` mode); older ones are destroyed after a run (``server_prune.py``).
    keep_own_snapshots: int = Field(default=DEFAULT_KEEP_OWN_SNAPSHOTS, ge=1)
    datasets: tuple[SourceDataset, ...] = Field(min_length=1)


class RetentionOverride(_Model):
    """Per-disk ``[disks.retention]``: each key given replaces the global one."""

    keep_last: int | None = Field(default=None, ge=1)
    hourly: int | None = Field(default=None, ge=0)
    daily: int | None = Field(default=None, ge=0)
    weekly: int | None = Field(default=None, ge=0)
    monthly: int | None = Field(default=None, ge=0)
    yearly: int | None = Field(default=None, ge=0)


class Retention(_Model):
    """How many snapshots to keep on a disk. ``keep_last`` newest always stay, plus the
    newest per hour/day/week/month/year for that many periods."""

    keep_last: int = Field(default=3, ge=1)
    hourly: int = Field(default=0, ge=0)
    daily: int = Field(default=7, ge=0)
    weekly: int = Field(default=4, ge=0)
    monthly: int = Field(default=12, ge=0)
    yearly: int = Field(default=2, ge=0)

    def overridden_by(self, override: RetentionOverride | None) -> Retention:
        if override is None:
            return self
        changes = {
            name: getattr(override, name)
            for name in RetentionOverride.model_fields
            if getattr(override, name) is not None
        }
        return self.model_copy(update=changes)


class Disk(_Model):
    """A rotated backup disk: ``[[disks]]``. The serial selects it, the pool GUID proves it."""

    label: Label
    serial: Serial
    pool_guid: PoolGuid
    pool_name: PoolName
    explicit_target_root: DatasetName | None = Field(default=None, alias="target_root")
    sources: Annotated[tuple[Label, ...], Field(min_length=1), AfterValidator(_unique)] | None = (
        None
    )
    retention: RetentionOverride | None = None

    @property
    def target_root(self) -> str:
        """The dataset under which backups land (default ``<pool_name>/backup``)."""
        return self.explicit_target_root or f"{self.pool_name}/backup"

    @property
    def identity(self) -> DiskIdentity:
        return DiskIdentity(
            serial=self.serial, pool_guid=self.pool_guid, pool_name=self.pool_name, label=self.label
        )


class DaemonSettings(_Model):
    """``[daemon]``: where the daemon keeps its state and how it reports."""

    state_dir: AbsolutePath = Path("/var/lib/zbackupd")
    control_socket: AbsolutePath = Path("/run/zbackupd/control.sock")
    stale_disk_warning_days: int = Field(default=14, ge=0)
    metrics_file: AbsolutePath | None = None
    ssh_key_file: AbsolutePath = Path("/var/lib/zbackupd/ssh/id_ed25519")
    keys_dir: AbsolutePath = Path("/var/lib/zbackupd/keys")

    @model_validator(mode="after")
    def _metrics_file_is_prom(self) -> DaemonSettings:
        if self.metrics_file is not None and self.metrics_file.suffix != ".prom":
            raise PydanticCustomError(
                "zbackupd_field",
                "{message}",
                {
                    "field": "metrics_file",
                    "message": "must end in '.prom': node_exporter's textfile collector "
                    "reads only *.prom files",
                },
            )
        return self


class Config(_Model):
    """The whole ``zbackupd.toml``."""

    daemon: DaemonSettings = DaemonSettings()
    retention: Retention = Retention()
    sources: tuple[Source, ...] = Field(min_length=1)
    disks: tuple[Disk, ...] = ()

    @model_validator(mode="after")
    def _relations_hold(self) -> Config:
        problems = _semantic_problems(_Entries.of(self))
        if problems:
            raise PydanticCustomError(
                _SEMANTIC_ERROR,
                "{summary}",
                {"summary": "; ".join(f"{p.key}: {p.message}" for p in problems)},
            )
        return self

    def disk_by_serial(self, serial: str) -> Disk | None:
        return next((disk for disk in self.disks if disk.serial == serial), None)

    def disk_by_label(self, label: str) -> Disk | None:
        return next((disk for disk in self.disks if disk.label == label), None)

    def disk_by_pool_guid(self, pool_guid: int) -> Disk | None:
        return next((disk for disk in self.disks if disk.pool_guid == pool_guid), None)

    def source_by_name(self, name: str) -> Source | None:
        return next((source for source in self.sources if source.name == name), None)

    def sources_for(self, disk: Disk) -> tuple[Source, ...]:
        """The sources backed up onto ``disk``, in configuration order."""
        if disk.sources is None:
            return self.sources
        return tuple(source for source in self.sources if source.name in disk.sources)

    def retention_for(self, disk: Disk) -> Retention:
        """The global ``[retention]`` with the disk's own overrides applied."""
        return self.retention.overridden_by(disk.retention)


# ------------------------------------------------------------ relations between fields

_SEMANTIC_ERROR: Final = "zbackupd_relations"


@dataclass(frozen=True, slots=True)
class _Entries:
    """The parts of a configuration that validated, each with its index in the file."""

    source_names: Sequence[tuple[int, str]]
    datasets: Sequence[tuple[int, Sequence[tuple[int, SourceDataset]]]]  # per source
    disks: Sequence[tuple[int, Disk]]

    @classmethod
    def of(cls, config: Config) -> _Entries:
        return cls(
            source_names=[(i, source.name) for i, source in enumerate(config.sources)],
            datasets=[(i, list(enumerate(s.datasets))) for i, s in enumerate(config.sources)],
            disks=list(enumerate(config.disks)),
        )


def _semantic_problems(entries: _Entries) -> list[ConfigProblem]:
    """Everything a single field cannot know: duplicates, overlaps, references, modes.

    Works on the entries that validated, so these problems are reported even while
    other entries (or other keys of the same source) are broken.
    """
    problems: list[ConfigProblem] = []
    for source_index, datasets in entries.datasets:
        problems.extend(_dataset_problems(f"sources[{source_index}]", datasets))
    problems.extend(
        _duplicates(
            ((f"sources[{i}].name", name) for i, name in entries.source_names), "source name"
        )
    )
    known_source_names = {name for _, name in entries.source_names}
    disks = entries.disks
    for index, disk in disks:
        key = f"disks[{index}]"
        root = disk.target_root
        if root != disk.pool_name and not root.startswith(disk.pool_name + "/"):
            problems.append(
                ConfigProblem(
                    f"{key}.target_root",
                    f"{root!r} is not inside pool {disk.pool_name!r}: it must be "
                    f"{disk.pool_name!r} or start with '{disk.pool_name}/'",
                )
            )
        for position, name in enumerate(disk.sources or ()):
            if name not in known_source_names:
                known = ", ".join(sorted(known_source_names)) or "none"
                problems.append(
                    ConfigProblem(
                        f"{key}.sources[{position}]",
                        f"no source is named {name!r} (known: {known})",
                    )
                )
    problems.extend(_duplicates(((f"disks[{i}].label", d.label) for i, d in disks), "label"))
    problems.extend(_duplicates(((f"disks[{i}].serial", d.serial) for i, d in disks), "serial"))
    problems.extend(
        _duplicates(((f"disks[{i}].pool_guid", d.pool_guid) for i, d in disks), "pool GUID")
    )
    return problems


def _dataset_problems(
    key: str, datasets: Sequence[tuple[int, SourceDataset]]
) -> Iterator[ConfigProblem]:
    for position, (index, dataset) in enumerate(datasets):
        entry = f"{key}.datasets[{index}]"
        if dataset.snapshots == "reuse" and dataset.reuse_pattern is None:
            yield ConfigProblem(
                f"{entry}.reuse_pattern",
                'required when snapshots = "reuse": the glob of the existing snapshots '
                'to send, e.g. "autosnap_*_daily"',
            )
        if dataset.snapshots == "create" and dataset.reuse_pattern is not None:
            yield ConfigProblem(
                f"{entry}.reuse_pattern",
                'only applies with snapshots = "reuse" (snapshots is "create")',
            )
        if dataset.snapshots == "reuse" and "snapshot_prefix" in dataset.model_fields_set:
            yield ConfigProblem(
                f"{entry}.snapshot_prefix",
                'only applies with snapshots = "create" (snapshots is "reuse")',
            )
        if not dataset.recursive:
            for field in ("include", "exclude"):
                if getattr(dataset, field):
                    yield ConfigProblem(f"{entry}.{field}", "only applies with recursive = true")
        for earlier_index, earlier in datasets[:position]:
            overlap = _overlap(earlier, dataset)
            if overlap:
                yield ConfigProblem(f"{entry}.root", f"{overlap} (datasets[{earlier_index}].root)")


def _overlap(first: SourceDataset, second: SourceDataset) -> str | None:
    if first.root == second.root:
        return f"{second.root!r} is already listed"
    for outer, inner in ((first, second), (second, first)):
        if outer.recursive and inner.root.startswith(outer.root + "/"):
            return (
                f"{inner.root!r} lies inside the recursive root {outer.root!r}; list the "
                "tree once and narrow it with include/exclude"
            )
    return None


def _duplicates(keyed_values: Iterable[tuple[str, object]], what: str) -> Iterator[ConfigProblem]:
    first_key_of: dict[object, str] = {}
    for key, value in keyed_values:
        if value in first_key_of:
            yield ConfigProblem(key, f"duplicate {what} {value!r} (also {first_key_of[value]})")
        else:
            first_key_of[value] = key


# ------------------------------------------------------------------------- loading


def load_config(path: Path) -> Config:
    """Read and validate ``path``; every problem, including an unreadable file, becomes
    one ``ConfigError`` naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        problem = ConfigProblem("", f"cannot read the file: {reason}")
        raise ConfigError(str(path), [problem]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path), [ConfigProblem("", f"is not UTF-8 text (byte {exc.start})")]
        ) from exc
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str) -> Config:
    """Validate TOML ``text``; ``source`` names it in error messages."""
    try:
        raw = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [_syntax_problem(exc)]) from exc
    document = _freeze(raw)
    try:
        return Config.model_validate(document)
    except ValidationError as exc:
        problems = [
            _problem_from(error)
            for error in exc.errors()
            if error["type"] != _SEMANTIC_ERROR and not _is_echo_of_item_error(error)
        ]
        problems.extend(_semantic_problems_of(document))
        raise ConfigError(source, problems) from None


def _syntax_problem(exc: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(exc)
    match = re.search(r"\s*\(at (line \d+, column \d+|end of document)\)$", message)
    if match:
        message = f"TOML syntax error at {match[1]}: {message[: match.start()]}"
    else:
        message = f"TOML syntax error: {message}"
    return ConfigProblem("", message)


def _freeze(value: object) -> object:
    """TOML arrays as tuples, so strict validation accepts them for frozen fields."""
    if isinstance(value, dict):
        return {key: _freeze(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def _semantic_problems_of(document: object) -> list[ConfigProblem]:
    """Relation checks over the entries that validate on their own."""
    if not isinstance(document, Mapping):
        return []
    raw_sources = document.get("sources", ())
    raw_disks = document.get("disks", ())
    raw_sources = raw_sources if isinstance(raw_sources, tuple) else ()
    raw_disks = raw_disks if isinstance(raw_disks, tuple) else ()
    source_names: list[tuple[int, str]] = []
    datasets: list[tuple[int, Sequence[tuple[int, SourceDataset]]]] = []
    for index, raw_source in enumerate(raw_sources):
        if not isinstance(raw_source, Mapping):
            continue
        name = raw_source.get("name")
        if isinstance(name, str):
            source_names.append((index, name))
        raw_datasets = raw_source.get("datasets", ())
        if isinstance(raw_datasets, tuple):
            datasets.append((index, _valid_entries(SourceDataset, raw_datasets)))
    disks = _valid_entries(Disk, raw_disks)
    return _semantic_problems(_Entries(source_names, datasets, disks))


def _valid_entries(model: type[_M], entries: tuple[object, ...]) -> list[tuple[int, _M]]:
    valid: list[tuple[int, _M]] = []
    for index, entry in enumerate(entries):
        try:
            valid.append((index, model.model_validate(entry)))
        except ValidationError:
            continue
    return valid


# ------------------------------------------------------------ pydantic → ConfigProblem

_TYPE_WORDS: Final = {
    "string_type": "a string (quote it)",
    "int_type": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "tuple_type": "an array",
    "model_type": "a table",
    "dict_type": "a table",
    "literal_error": None,
}


def _is_echo_of_item_error(error: ErrorDetails) -> bool:
    """Pydantic counts a tuple's items *after* validation, so one broken entry also
    yields "too short"; the array was long enough and the entry's own error says why."""
    if error["type"] != "too_short":
        return False
    given = error["input"]
    needed = (error.get("ctx") or {}).get("min_length", 1)
    return isinstance(given, tuple) and len(given) >= needed


def _problem_from(error: ErrorDetails) -> ConfigProblem:
    location: tuple[int | str, ...] = tuple(error["loc"])
    context = error.get("ctx") or {}
    kind = error["type"]
    if kind == "zbackupd_field":
        location = (*location, str(context["field"]))
        message = str(context["message"])
    elif kind == "value_error":
        message = str(context.get("error", error["msg"]))
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        message = _unknown_key_message(location)
    elif _TYPE_WORDS.get(kind):
        message = f"expected {_TYPE_WORDS[kind]}, got {_describe(error['input'])}"
    elif kind == "too_short":
        message = f"must have at least {context.get('min_length', 1)} entry"
    else:
        message = error["msg"].replace("Input should be", "must be", 1)
        if kind == "literal_error":
            message += f", got {_describe(error['input'])}"
    return ConfigProblem(_dotted(location), message)


def _dotted(location: Sequence[int | str]) -> str:
    key = ""
    for part in location:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else part)
    return key


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:  # noqa: PLR2004 -- keep one problem on one readable line
        text = text[:57] + "..."
    return (
        f"{_toml_type(value)} {text}"
        if not isinstance(value, Mapping | tuple)
        else (_toml_type(value))
    )


def _toml_type(value: object) -> str:  # noqa: PLR0911 -- one return per TOML type
    match value:
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a float"
        case str():
            return "a string"
        case Mapping():
            return "a table"
        case tuple() | list():
            return "an array"
        case _:
            return f"a {type(value).__name__}"


def _unknown_key_message(location: Sequence[int | str]) -> str:
    unknown = str(location[-1])
    allowed = _allowed_keys(location[:-1])
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(unknown, allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key (allowed here: {', '.join(allowed)})"


def _allowed_keys(location: Sequence[int | str]) -> list[str]:
    """The keys a table at ``location`` accepts, walking the models from ``Config``."""
    model: type[BaseModel] | None = Config
    for part in location:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or name) == part), None
        )
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (tuple, typing.Union, types.UnionType, Annotated):
        for argument in typing.get_args(annotation):
            found = _model_in(argument)
            if found is not None:
                return found
    return None
