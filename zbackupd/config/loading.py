"""Loading the configuration: TOML text → ``Config``, or one ``ConfigError`` listing *every*
problem, each naming the file and the dotted key, so an admin fixes the whole file in one
pass instead of one error per restart.

Loading is pure apart from reading the file. Pydantic's errors are translated into
sentences for the admin (with a did-you-mean for unknown keys), and the relation checks
run again on the entries that validated on their own, so they are reported even while
other entries are broken.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from zbackupd.config.fields import toml_type
from zbackupd.config.models import (
    SEMANTIC_ERROR,
    Config,
    ConfigError,
    ConfigProblem,
    Disk,
    Entries,
    SourceDataset,
    semantic_problems,
)

DEFAULT_CONFIG_PATH: Final = Path("/etc/zbackupd/zbackupd.toml")

_M = typing.TypeVar("_M", bound=BaseModel)


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
            if error["type"] != SEMANTIC_ERROR and not _is_echo_of_item_error(error)
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
    return semantic_problems(Entries(source_names, datasets, disks))


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
        f"{toml_type(value)} {text}"
        if not isinstance(value, Mapping | tuple)
        else (toml_type(value))
    )


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
