"""The vocabulary shared by every layer: entries, events, write operations and domain errors.

Nothing here knows gRPC, protobuf or storage. Keys are `str`, values `bytes`, times are integer
milliseconds since the Unix epoch, and a revision is the store-wide change counter.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import TypeVar

NO_EXPIRY = 0
"""The `expire_at_ms` of a key that never expires."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A key as stored: its value and metadata."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    expire_at_ms: int = NO_EXPIRY
    content_type: str = ""

    def expired(self, now_ms: int) -> bool:
        return self.expire_at_ms != NO_EXPIRY and self.expire_at_ms <= now_ms

    def without_value(self) -> Entry:
        return replace(self, value=b"")


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: deadlines are absolute so that restarts keep them."""
    return time.time_ns() // 1_000_000


class EventType(enum.IntEnum):
    PUT = 1
    DELETE = 2
    EXPIRE = 3


@dataclass(frozen=True, slots=True)
class Event:
    """One change of one key, at its own revision.

    `entry` is the key after a PUT; for DELETE and EXPIRE it is None. `prev` is the key before
    the change, or None if it did not exist.
    """

    type: EventType
    revision: int
    key: str
    entry: Entry | None
    prev: Entry | None


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys `k` with `start <= k < end`; an `end` of None means no upper bound."""

    start: str
    end: str | None

    @staticmethod
    def single(key: str) -> KeyRange:
        return KeyRange(key, key + "\0")

    @staticmethod
    def prefix(prefix: str) -> KeyRange:
        return KeyRange(prefix, prefix_end(prefix))

    def contains(self, key: str) -> bool:
        return self.start <= key and (self.end is None or key < self.end)


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with `prefix`.

    Python compares strings by code point, which is the same order as their UTF-8 bytes, so this
    is also the byte-order bound SQLite uses. None means there is no such bound.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            successor = last + 1
            if 0xD800 <= successor <= 0xDFFF:  # surrogates are not valid in UTF-8 text
                successor = 0xE000
            return "".join(chars) + chr(successor)
    return None


@dataclass(frozen=True, slots=True)
class Condition:
    """What must hold of a key for a write to apply. Zero or False fields check nothing."""

    must_exist: bool = False
    must_not_exist: bool = False
    mod_revision: int = 0
    version: int = 0

    def holds_for(self, current: Entry | None) -> bool:
        if self.must_not_exist:
            return current is None
        needs_key = self.must_exist or self.mod_revision or self.version
        if not needs_key:
            return True
        if current is None:
            return False
        if self.mod_revision and current.mod_revision != self.mod_revision:
            return False
        return not (self.version and current.version != self.version)

    def describe(self) -> str:
        parts = []
        if self.must_not_exist:
            parts.append("the key must not exist")
        if self.must_exist:
            parts.append("the key must exist")
        if self.mod_revision:
            parts.append(f"mod_revision must be {self.mod_revision}")
        if self.version:
            parts.append(f"version must be {self.version}")
        return " and ".join(parts)


ALWAYS = Condition()


@dataclass(frozen=True, slots=True)
class PutOp:
    key: str
    value: bytes
    expire_at_ms: int = NO_EXPIRY
    condition: Condition = ALWAYS
    content_type: str = ""


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Delete `key`, or with `prefix` every key that starts with it."""

    key: str
    prefix: bool = False
    allow_missing: bool = False
    condition: Condition = ALWAYS


@dataclass(frozen=True, slots=True)
class ExpireOp:
    """Remove the keys whose deadline is at or before `now_ms` (at most `limit` of them)."""

    now_ms: int
    limit: int


@dataclass(frozen=True, slots=True)
class CompactOp:
    """Discard the events at or below `revision` (never above the current revision)."""

    revision: int


WriteOp = PutOp | DeleteOp | ExpireOp | CompactOp


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    created: bool
    entry: Entry
    prev: Entry | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class ExpireResult:
    revision: int
    expired: int


@dataclass(frozen=True, slots=True)
class CompactResult:
    compact_revision: int


WriteResult = PutResult | DeleteResult | ExpireResult | CompactResult
R = TypeVar("R", PutResult, DeleteResult, ExpireResult, CompactResult)


def expect(result: WriteResult, kind: type[R]) -> R:
    """Narrow the result of a write to the kind its operation produces."""
    if not isinstance(result, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(result).__name__}")
    return result


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a range read at `revision`; `more` says whether keys follow `entries`."""

    revision: int
    entries: tuple[Entry, ...]
    more: bool


@dataclass(frozen=True, slots=True)
class StoreStats:
    revision: int
    compact_revision: int
    key_count: int
    details: dict[str, int] = field(default_factory=dict)


class KvError(Exception):
    """Base of the errors the service reports to clients."""


class InvalidArgument(KvError):
    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field_name = field_name


class KeyNotFound(KvError):
    def __init__(self, key: str) -> None:
        super().__init__(f"key not found: {key!r}")
        self.key = key


class ConditionFailed(KvError):
    def __init__(self, key: str, condition: Condition, current: Entry | None) -> None:
        state = (
            "it does not exist"
            if current is None
            else f"it has mod_revision {current.mod_revision} and version {current.version}"
        )
        super().__init__(f"condition failed for key {key!r}: {condition.describe()}, but {state}")
        self.key = key


class Compacted(KvError):
    """The history a request needs is older than the oldest retained revision."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} is compacted: history is retained only after revision {compact_revision}"
        )
        self.requested = requested
        self.compact_revision = compact_revision


class FutureRevision(KvError):
    def __init__(self, requested: int, current: int) -> None:
        super().__init__(f"revision {requested} is in the future: the current revision is {current}")


class ResourceExhausted(KvError):
    pass


class StorageFailure(KvError):
    """The store cannot complete the operation (disk full, I/O error, closed)."""


class ShuttingDown(KvError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down")
