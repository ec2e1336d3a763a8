"""Small value types the gate needs too: standard library only and cheap to import.

``zbackupd-gate`` starts once per SSH command (issue 16: it may cost at most 1.2x a plain
shell), so what it imports avoids ``dataclasses`` (which pulls in ``inspect``, ``ast``,
``dis`` …): ``Record`` gives slotted, immutable values with equality, hash and repr.
"""

from __future__ import annotations

from enum import Enum


class Record:
    """An immutable value: equality, hash and repr by its ``__slots__``, in order.

    A subclass lists its fields in ``__slots__`` (and as annotations, for mypy) and sets
    them once in ``__init__`` with ``self._init(field=value, ...)``.
    """

    __slots__: tuple[str, ...] = ()

    def _init(self, **fields: object) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (setting {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (deleting {name!r})")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self) or not isinstance(other, Record):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._fields()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


class Encryption(Enum):
    """How a source dataset is stored, which decides how it is sent (design.md §4)."""

    ENCRYPTED = "encrypted"  # sent raw (-w): lands with the server's key
    PLAIN = "plain"  # sent -L -c: lands encrypted under the disk pool's key
