"""The daemon's configuration: ``/etc/zbackupd/zbackupd.toml`` as frozen, typed models.

``parse_config`` (or ``load_config`` on a file) turns TOML text into a ``Config`` or raises
one ``ConfigError`` that lists *every* problem, each naming the file and the dotted key.

- ``fields.py``: the name grammars and value shapes, as annotated field types (pure);
- ``models.py``: the pydantic models, ``ConfigError`` and the relations between fields;
- ``loading.py``: TOML loading and the translation of pydantic's errors into problems.

This package's public API is re-exported here: import from ``zbackupd.config``.
"""

from zbackupd.config.fields import glob_matches, host_key_problem
from zbackupd.config.loading import DEFAULT_CONFIG_PATH, load_config, parse_config
from zbackupd.config.models import (
    DEFAULT_CIPHERS,
    DEFAULT_KEEP_OWN_SNAPSHOTS,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_SNAPSHOT_PREFIX,
    DEFAULT_WINDOW_BYTES,
    SUPPORTED_CIPHERS,
    Alerts,
    Config,
    ConfigError,
    ConfigProblem,
    DaemonSettings,
    Disk,
    Retention,
    RetentionOverride,
    SnapshotMode,
    Source,
    SourceDataset,
)

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_KEEP_OWN_SNAPSHOTS",
    "DEFAULT_SNAPSHOT_PREFIX",
    "DEFAULT_WINDOW_BYTES",
    "SUPPORTED_CIPHERS",
    "Alerts",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DaemonSettings",
    "Disk",
    "Retention",
    "RetentionOverride",
    "SnapshotMode",
    "Source",
    "SourceDataset",
    "glob_matches",
    "host_key_problem",
    "load_config",
    "parse_config",
]
