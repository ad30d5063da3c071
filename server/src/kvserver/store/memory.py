"""A store that keeps everything in memory: for tests and throw-away use. Nothing survives a restart."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

from sortedcontainers import SortedDict, SortedSet

from kvserver.domain import (
    Compacted,
    Entry,
    Event,
    FutureRevision,
    KeyRange,
    KvError,
    Page,
    StoreStats,
    WriteOp,
    WriteResult,
    wall_clock_ms,
)
from kvserver.store.base import EventListener
from kvserver.store.planner import plan_batch


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._entries: SortedDict[str, Entry] = SortedDict()
        # Every revision is exactly one event, so the event of revision r is at index
        # r - compact_revision - 1.
        self._events: list[Event] = []
        self._revision = 0
        self._compact_revision = 0
        self._event_times: list[int] = []
        self._deadlines: SortedSet[tuple[int, str]] = SortedSet()
        self._listeners: list[EventListener] = []

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # The state view the planner reads.
    def lookup(self, key: str) -> Entry | None:
        entry: Entry | None = self._entries.get(key)
        return entry

    def scan(self, keys: KeyRange) -> Iterable[Entry]:
        return [self._entries[key] for key in self._irange(keys, after=None)]

    def due(self, now_ms: int, limit: int) -> Iterable[Entry]:
        due = self._deadlines.irange(maximum=(now_ms, chr(0x10FFFF)))
        return [self._entries[key] for _, key in islice(due, limit)]

    def _irange(self, keys: KeyRange, after: str | None) -> Iterator[str]:
        start = keys.start if after is None or after < keys.start else after
        inclusive_start = after is None or after < keys.start
        iterator: Iterator[str] = self._entries.irange(
            minimum=start, maximum=keys.end, inclusive=(inclusive_start, False)
        )
        return iterator

    async def get(self, key: str, now_ms: int, *, serializable: bool = False) -> tuple[int, Entry | None]:
        entry = self._entries.get(key)
        if entry is not None and entry.expired(now_ms):
            entry = None
        return self._revision, entry

    async def write(self, op: WriteOp) -> WriteResult:
        result = self._apply([op])[0]
        if isinstance(result, KvError):
            raise result
        return result

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult | KvError]:
        return self._apply(ops) if ops else []

    def _apply(self, ops: Sequence[WriteOp]) -> list[WriteResult | KvError]:
        """Plan `ops` as one batch, apply its events and tell the listeners: one result per op."""
        now = wall_clock_ms()
        plan = plan_batch(self, self._revision, ops, now_ms=now)
        for event in plan.events:
            self._set(event.key, event.entry)
        self._events.extend(plan.events)
        self._event_times.extend([now] * len(plan.events))
        self._revision = plan.revision
        if plan.compact_revision is not None:
            self._compact(plan.compact_revision)
        if plan.events:
            for listener in self._listeners:
                listener(plan.events)
        return plan.results

    def _set(self, key: str, entry: Entry | None) -> None:
        old = self._entries.pop(key, None)
        if old is not None and old.expire_at_ms:
            self._deadlines.discard((old.expire_at_ms, key))
        if entry is not None:
            self._entries[key] = entry
            if entry.expire_at_ms:
                self._deadlines.add((entry.expire_at_ms, key))

    def _compact(self, revision: int) -> None:
        drop = revision - self._compact_revision
        if drop > 0:
            del self._events[:drop]
            del self._event_times[:drop]
            self._compact_revision = revision

    def _events_after(self, revision: int) -> list[Event]:
        if revision < self._compact_revision:
            raise Compacted(revision, self._compact_revision)
        if revision > self._revision:
            raise FutureRevision(revision, self._revision)
        return self._events[revision - self._compact_revision :]

    def _state_at(self, keys: KeyRange, revision: int, after: str | None) -> Iterator[Entry]:
        """The entries of `keys` as of `revision`, in key order, expired ones included."""
        first_change: dict[str, Event] = {}
        for event in self._events_after(revision):
            if keys.contains(event.key) and (after is None or event.key > after):
                first_change.setdefault(event.key, event)
        candidates = heapq.merge(self._irange(keys, after), sorted(first_change))
        previous = None
        for key in candidates:
            if key == previous:
                continue
            previous = key
            change = first_change.get(key)
            entry = change.prev if change is not None else self._entries[key]
            if entry is not None:
                yield entry

    async def range(
        self,
        keys: KeyRange,
        *,
        revision: int,
        after: str | None,
        limit: int,
        keys_only: bool,
        now_ms: int,
    ) -> Page:
        live = (entry for entry in self._state_at(keys, revision, after) if not entry.expired(now_ms))
        found = list(islice(live, limit + 1))
        entries = found[:limit]
        if keys_only:
            entries = [entry.without_value() for entry in entries]
        return Page(revision, tuple(entries), more=len(found) > limit)

    async def count(self, keys: KeyRange, *, revision: int, now_ms: int) -> int:
        return sum(1 for entry in self._state_at(keys, revision, None) if not entry.expired(now_ms))

    async def events(
        self, keys: KeyRange, *, start_revision: int, end_revision: int, limit: int
    ) -> list[Event]:
        if start_revision <= self._compact_revision:
            raise Compacted(start_revision, self._compact_revision)
        selected = (
            event
            for event in self._events_after(min(start_revision - 1, self._revision))
            if event.revision <= end_revision and keys.contains(event.key)
        )
        return list(islice(selected, limit))

    async def revision_at(self, time_ms: int) -> int:
        index = bisect.bisect_left(self._event_times, time_ms)
        return self._compact_revision + index

    async def next_expiry(self) -> int | None:
        return self._deadlines[0][0] if self._deadlines else None

    async def stats(self) -> StoreStats:
        return StoreStats(self._revision, self._compact_revision, len(self._entries))

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None


__all__ = ["MemoryStore"]
