"""The configuration's models: ``zbackupd.toml`` as frozen, typed pydantic models.

Field shapes (types, names, ranges) come from the annotated types of ``fields.py`` and are
checked by pydantic; relations between fields (duplicates, overlaps, references) by
``semantic_problems``, which ``loading.py`` also runs on the entries that did validate when
others did not. ``ConfigError`` is the one error a configuration raises, listing every
``ConfigProblem``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from zbackupd.config.fields import (
    AbsolutePath,
    Cipher,
    DatasetGlob,
    DatasetName,
    HostKey,
    HostName,
    Label,
    PoolGuid,
    PoolName,
    Serial,
    SnapshotGlob,
    SnapshotPrefix,
    UserName,
    WindowBytes,
    glob_matches,
    unique,
)
from zbackupd.core.model import DiskIdentity
from zbackupd.errors import PermanentError
from zbackupd.zfs import names

# SSH transport defaults (design.md §5): AES-GCM before chacha20, which is about half as
# fast here; a 16 MiB window covers a WAN bandwidth-delay product.
DEFAULT_CIPHERS: Final = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
SUPPORTED_CIPHERS: Final = frozenset({*DEFAULT_CIPHERS, "aes128-ctr", "aes192-ctr", "aes256-ctr"})
DEFAULT_WINDOW_BYTES: Final = 16 * 1024 * 1024
DEFAULT_KEEPALIVE_INTERVAL: Final = 15.0
#: 15 s x 4 unanswered keepalives: a cut link is noticed within about a minute.
DEFAULT_KEEPALIVE_COUNT_MAX: Final = 4
#: Retries of a source after a transient failure (issue 12): for up to ten minutes, after
#: these waits, the last one repeated.
DEFAULT_RETRY_WINDOW_SECONDS: Final = 600
DEFAULT_RETRY_BACKOFF_SECONDS: Final = (10, 20, 40, 80, 120)
#: No byte moved for this long: the transfer step is aborted (and resumed on a retry).
DEFAULT_STALL_TIMEOUT_SECONDS: Final = 300
DEFAULT_SNAPSHOT_PREFIX: Final = names.DEFAULT_PREFIX
DEFAULT_KEEP_OWN_SNAPSHOTS: Final = 1

SnapshotMode = Literal["create", "reuse"]


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
    ciphers: Annotated[tuple[Cipher, ...], Field(min_length=1), AfterValidator(unique)] = (
        DEFAULT_CIPHERS
    )
    window_bytes: WindowBytes = DEFAULT_WINDOW_BYTES
    keepalive_interval: float = Field(default=DEFAULT_KEEPALIVE_INTERVAL, gt=0, le=3600)
    #: Unanswered keepalives before the link counts as dropped.
    keepalive_count_max: int = Field(default=DEFAULT_KEEPALIVE_COUNT_MAX, ge=1, le=100)
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
    sources: Annotated[tuple[Label, ...], Field(min_length=1), AfterValidator(unique)] | None = None
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
    #: How long after a source's first transient failure it may still be tried again
    #: (while the disk stays attached); 0: never retried.
    retry_window_seconds: int = Field(default=DEFAULT_RETRY_WINDOW_SECONDS, ge=0, le=86400)
    #: The waits before the retries, the last one repeated.
    retry_backoff_seconds: Annotated[
        tuple[Annotated[int, Field(gt=0, le=3600)], ...], Field(min_length=1)
    ] = DEFAULT_RETRY_BACKOFF_SECONDS
    #: A transfer step that moves no byte for this long, or a remote command that takes
    #: longer, is aborted as a transient failure (retried, resumed from its token).
    stall_timeout_seconds: int = Field(default=DEFAULT_STALL_TIMEOUT_SECONDS, ge=1, le=86400)

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


AlertEventName = Literal["failure", "stale", "success"]


def _absolute_program(argv: tuple[str, ...]) -> tuple[str, ...]:
    if not argv[0].startswith("/"):
        raise ValueError(
            f"the program {argv[0]!r} must be an absolute path (the daemon's PATH is not yours)"
        )
    return argv


class Alerts(_Model):
    """``[alerts]``: a program run when a disk's run fails, when a disk turns stale, and
    (if listed in ``on``) after a good run; the facts arrive in ``ZBACKUPD_*`` variables
    and as JSON on its stdin."""

    command: (
        Annotated[tuple[str, ...], Field(min_length=1), AfterValidator(_absolute_program)] | None
    ) = None
    on: Annotated[tuple[AlertEventName, ...], AfterValidator(unique)] = ("failure", "stale")
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)


class Config(_Model):
    """The whole ``zbackupd.toml``."""

    daemon: DaemonSettings = DaemonSettings()
    alerts: Alerts = Alerts()
    retention: Retention = Retention()
    sources: tuple[Source, ...] = Field(min_length=1)
    disks: tuple[Disk, ...] = ()

    @model_validator(mode="after")
    def _relations_hold(self) -> Config:
        problems = semantic_problems(Entries.of(self))
        if problems:
            raise PydanticCustomError(
                SEMANTIC_ERROR,
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

#: The pydantic error type under which ``Config`` reports broken relations; ``loading.py``
#: drops it and reports the same problems one by one from ``semantic_problems``.
SEMANTIC_ERROR: Final = "zbackupd_relations"


@dataclass(frozen=True, slots=True)
class Entries:
    """The parts of a configuration that validated, each with its index in the file."""

    source_names: Sequence[tuple[int, str]]
    datasets: Sequence[tuple[int, Sequence[tuple[int, SourceDataset]]]]  # per source
    disks: Sequence[tuple[int, Disk]]

    @classmethod
    def of(cls, config: Config) -> Entries:
        return cls(
            source_names=[(i, source.name) for i, source in enumerate(config.sources)],
            datasets=[(i, list(enumerate(s.datasets))) for i, s in enumerate(config.sources)],
            disks=list(enumerate(config.disks)),
        )


def semantic_problems(entries: Entries) -> list[ConfigProblem]:
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
        first_index, first = datasets[0]
        if dataset.snapshot_prefix != first.snapshot_prefix:
            yield ConfigProblem(
                f"{entry}.snapshot_prefix",
                f"{dataset.snapshot_prefix!r}, but datasets[{first_index}] uses "
                f"{first.snapshot_prefix!r}: a source's datasets share one prefix (it names "
                "the run snapshots, holds and cursors, and the server's gate accepts one)",
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
