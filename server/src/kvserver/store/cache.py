"""An LRU read cache in front of a store ("persistent with caching").

The cache holds the latest committed state of recently read keys, absent keys included. It
learns every change from the store's events before the write is acknowledged, so it never
serves a stale value; expired entries are filtered on every read like the store does. A read
that misses records a placeholder first: if the key changes while the read is in flight, the
placeholder is gone and the (possibly older) result is not cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvserver.domain import Entry, Event, KeyRange, KvError, Page, StoreStats, WriteOp, WriteResult
from kvserver.store.base import EventListener, Store


class _Loading:
    """Placeholder for a key whose read is in flight."""


class CachedStore:
    def __init__(self, store: Store, capacity: int) -> None:
        self._store = store
        self._capacity = capacity
        self._entries: OrderedDict[str, Entry | _Loading | None] = OrderedDict()
        self.name = store.name
        self.hits = 0
        self.misses = 0
        store.add_listener(self._invalidate)

    @property
    def revision(self) -> int:
        return self._store.revision

    @property
    def compact_revision(self) -> int:
        return self._store.compact_revision

    @property
    def inner(self) -> Store:
        """The store behind the cache."""
        return self._store

    def add_listener(self, listener: EventListener) -> None:
        self._store.add_listener(listener)

    def _invalidate(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.key in self._entries:
                self._entries[event.key] = event.entry

    async def get(self, key: str, now_ms: int, *, serializable: bool = False) -> tuple[int, Entry | None]:
        cached = self._entries.get(key, _MISSING)
        if not isinstance(cached, _Loading) and cached is not _MISSING:
            self.hits += 1
            self._entries.move_to_end(key)
            entry = cached if isinstance(cached, Entry) and not cached.expired(now_ms) else None
            return self._store.revision, entry
        self.misses += 1
        placeholder = _Loading()
        self._entries[key] = placeholder
        self._evict()
        try:
            revision, entry = await self._store.get(key, now_ms)
        except BaseException:
            if self._entries.get(key) is placeholder:
                del self._entries[key]
            raise
        if self._entries.get(key) is placeholder:
            self._entries[key] = entry
        return revision, entry

    def _evict(self) -> None:
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    async def write(self, op: WriteOp) -> WriteResult:
        return await self._store.write(op)

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult | KvError]:
        # The inner store's listeners (`_invalidate`) see every applied op's events before this
        # returns, as for `write`.
        return await self._store.write_many(ops)

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
        return await self._store.range(
            keys, revision=revision, after=after, limit=limit, keys_only=keys_only, now_ms=now_ms
        )

    async def count(self, keys: KeyRange, *, revision: int, now_ms: int) -> int:
        return await self._store.count(keys, revision=revision, now_ms=now_ms)

    async def events(
        self, keys: KeyRange, *, start_revision: int, end_revision: int, limit: int
    ) -> list[Event]:
        return await self._store.events(
            keys, start_revision=start_revision, end_revision=end_revision, limit=limit
        )

    async def revision_at(self, time_ms: int) -> int:
        return await self._store.revision_at(time_ms)

    async def next_expiry(self) -> int | None:
        return await self._store.next_expiry()

    async def stats(self) -> StoreStats:
        stats = await self._store.stats()
        details = {**stats.details, "cache_entries": len(self._entries), "cache_hits": self.hits}
        details["cache_misses"] = self.misses
        return StoreStats(stats.revision, stats.compact_revision, stats.key_count, details)

    async def check(self) -> None:
        await self._store.check()

    async def close(self) -> None:
        await self._store.close()


_MISSING = object()
