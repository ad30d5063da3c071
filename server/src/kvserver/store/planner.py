"""The write semantics every local store shares: conditions, revisions, versions and events.

A store hands a batch of write operations to `plan_batch` together with a view of the current
state; the plan says what each operation returns and which events (and so which row changes)
the batch makes. The store then persists the plan atomically. Keeping this logic pure means the
memory and SQLite stores cannot disagree about what a write does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvserver.domain import (
    CompactOp,
    CompactResult,
    ConditionFailed,
    DeleteOp,
    DeleteResult,
    Entry,
    Event,
    EventType,
    ExpireOp,
    ExpireResult,
    KeyNotFound,
    KeyRange,
    KvError,
    PutOp,
    PutResult,
    WriteOp,
    WriteResult,
)


class StateView(Protocol):
    """The committed state a batch starts from."""

    def lookup(self, key: str) -> Entry | None: ...

    def scan(self, keys: KeyRange) -> Iterable[Entry]:
        """Every entry of `keys`, expired or not, in any order."""

    def due(self, now_ms: int, limit: int) -> Iterable[Entry]:
        """Up to `limit` entries whose deadline is at or before `now_ms`."""


@dataclass
class BatchPlan:
    """The outcome of a batch: one result or error per operation, and the events to persist."""

    start_revision: int
    results: list[WriteResult | KvError] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    compact_revision: int | None = None

    @property
    def revision(self) -> int:
        return self.events[-1].revision if self.events else self.start_revision

    def final_rows(self) -> tuple[dict[str, Entry], set[str]]:
        """The rows to upsert and the keys to delete, after every event of the batch."""
        upserts: dict[str, Entry] = {}
        deletes: set[str] = set()
        for event in self.events:
            if event.entry is not None:
                upserts[event.key] = event.entry
                deletes.discard(event.key)
            else:
                upserts.pop(event.key, None)
                deletes.add(event.key)
        return upserts, deletes


class _Overlay:
    """The state as changed by the batch so far, over the committed state."""

    def __init__(self, base: StateView) -> None:
        self._base = base
        self._changed: dict[str, Entry | None] = {}

    def lookup(self, key: str) -> Entry | None:
        if key in self._changed:
            return self._changed[key]
        return self._base.lookup(key)

    def set(self, key: str, entry: Entry | None) -> None:
        self._changed[key] = entry

    def scan(self, keys: KeyRange) -> list[Entry]:
        found = {entry.key: entry for entry in self._base.scan(keys) if entry.key not in self._changed}
        for key, entry in self._changed.items():
            if entry is not None and keys.contains(key):
                found[key] = entry
        return [found[key] for key in sorted(found)]

    def due(self, now_ms: int, limit: int) -> list[Entry]:
        candidates = [self.lookup(entry.key) for entry in self._base.due(now_ms, limit)]
        candidates += [entry for entry in self._changed.values() if entry is not None]
        unique = {entry.key: entry for entry in candidates if entry is not None and entry.expired(now_ms)}
        return sorted(unique.values(), key=lambda entry: (entry.expire_at_ms, entry.key))[:limit]


class _Planner:
    def __init__(self, state: StateView, revision: int, now_ms: int) -> None:
        self.state = _Overlay(state)
        self.plan = BatchPlan(start_revision=revision)
        self.revision = revision
        self.now_ms = now_ms

    def emit(self, type_: EventType, key: str, entry: Entry | None, prev: Entry | None) -> None:
        self.plan.events.append(Event(type_, self.revision, key, entry, prev))
        self.state.set(key, entry)

    def live(self, key: str) -> Entry | None:
        """The key's entry, first expiring it (as its own revision) if its deadline has passed."""
        entry = self.state.lookup(key)
        if entry is not None and entry.expired(self.now_ms):
            self.revision += 1
            self.emit(EventType.EXPIRE, key, None, entry)
            return None
        return entry

    def put(self, op: PutOp) -> PutResult:
        current = self.live(op.key)
        if not op.condition.holds_for(current):
            raise ConditionFailed(op.key, op.condition, current)
        self.revision += 1
        entry = Entry(
            key=op.key,
            value=op.value,
            create_revision=current.create_revision if current else self.revision,
            mod_revision=self.revision,
            version=current.version + 1 if current else 1,
            expire_at_ms=op.expire_at_ms,
            content_type=op.content_type,
        )
        self.emit(EventType.PUT, op.key, entry, current)
        return PutResult(self.revision, current is None, entry, current)

    def delete(self, op: DeleteOp) -> DeleteResult:
        if op.prefix:
            scanned = (self.live(entry.key) for entry in self.state.scan(KeyRange.prefix(op.key)))
            victims = [entry for entry in scanned if entry is not None]
        else:
            current = self.live(op.key)
            if not op.condition.holds_for(current):
                raise ConditionFailed(op.key, op.condition, current)
            if current is None and not op.allow_missing:
                raise KeyNotFound(op.key)
            victims = [current] if current is not None else []
        for entry in victims:
            self.revision += 1
            self.emit(EventType.DELETE, entry.key, None, entry)
        return DeleteResult(self.revision, tuple(victims))

    def expire(self, op: ExpireOp) -> ExpireResult:
        due = self.state.due(op.now_ms, op.limit)
        for entry in due:
            self.revision += 1
            self.emit(EventType.EXPIRE, entry.key, None, entry)
        return ExpireResult(self.revision, len(due))

    def compact(self, op: CompactOp) -> CompactResult:
        target = min(op.revision, self.revision)
        self.plan.compact_revision = max(self.plan.compact_revision or 0, target)
        return CompactResult(target)

    def apply(self, op: WriteOp) -> WriteResult:
        if isinstance(op, PutOp):
            return self.put(op)
        if isinstance(op, DeleteOp):
            return self.delete(op)
        if isinstance(op, ExpireOp):
            return self.expire(op)
        return self.compact(op)


def plan_batch(state: StateView, revision: int, ops: Sequence[WriteOp], now_ms: int) -> BatchPlan:
    """Apply `ops` in order on top of `state` at `revision`.

    An operation that fails (a failed condition, an absent key) gets its error as its result and
    changes nothing, except that keys found expired on the way are expired as their own events.
    """
    planner = _Planner(state, revision, now_ms)
    for op in ops:
        try:
            planner.plan.results.append(planner.apply(op))
        except KvError as error:
            planner.plan.results.append(error)
    return planner.plan
