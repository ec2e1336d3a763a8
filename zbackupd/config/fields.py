"""The configuration's field types: each name grammar and value shape as an annotated type.

Pure and pydantic-facing: every checker raises ``ValueError`` with the sentence an admin
reads (pydantic reports only ``ValueError`` from validators), and ``models.py`` builds its
models from the annotated types at the bottom. ``glob_matches`` is the one glob semantics
shared by the config and the session (see docs/configuration.md).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from zbackupd.zfs import names

MIN_WINDOW_BYTES: Final = 64 * 1024
MAX_WINDOW_BYTES: Final = 2**32 - 1  # the SSH window is a uint32
MAX_UINT64: Final = 2**64 - 1


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
            f"expected an integer or a string of digits, got {toml_type(value)}"
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
            f"expected a path string, got {toml_type(value)}"
        )
    if "\0" in value or not PurePosixPath(value).is_absolute():
        raise ValueError(f"{value!r} must be an absolute path")
    return Path(value)


def unique(values: tuple[str, ...]) -> tuple[str, ...]:
    """An array's validator: no value listed twice."""
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


def toml_type(value: object) -> str:  # noqa: PLR0911 -- one return per TOML type
    """How the type of a TOML value reads in a message: "an integer", "a table", ..."""
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
