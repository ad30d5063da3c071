"""Background upkeep of a store: removing expired keys and trimming the event history."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kvserver.config import HistoryRetention
from kvserver.domain import CompactOp, ExpireOp, ExpireResult, KvError, expect, wall_clock_ms
from kvserver.store.base import Store

log = logging.getLogger(__name__)

_EXPIRE_BATCH = 1000
_MAX_REAPER_SLEEP_S = 0.5
_COMPACT_EVERY_S = 5.0


class Maintenance:
    """Runs the reaper (EXPIRE events for keys whose TTL passed) and history compaction."""

    def __init__(self, store: Store, retention: HistoryRetention) -> None:
        self._store = store
        self._retention = retention
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._reap_forever(), name="ttl-reaper"),
            asyncio.create_task(self._compact_forever(), name="history-compaction"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def reap_once(self) -> int:
        """Expire the keys whose deadline has passed; returns how many."""
        expired = 0
        while True:
            result = expect(await self._store.write(ExpireOp(wall_clock_ms(), _EXPIRE_BATCH)), ExpireResult)
            expired += result.expired
            if result.expired < _EXPIRE_BATCH:
                return expired

    async def compact_once(self) -> int:
        """Discard the history the retention no longer covers; returns the compact revision."""
        revision = self._store.revision
        by_count = revision - self._retention.max_events
        by_age = await self._store.revision_at(wall_clock_ms() - int(self._retention.max_age_s * 1000))
        target = max(by_count, by_age)
        if target > self._store.compact_revision:
            await self._store.write(CompactOp(target))
        return self._store.compact_revision

    async def _reap_forever(self) -> None:
        while True:
            try:
                await self.reap_once()
                deadline = await self._store.next_expiry()
            except KvError as error:
                log.warning("ttl reaper: %s", error)
                deadline = None
            delay = _MAX_REAPER_SLEEP_S
            if deadline is not None:
                delay = min(delay, max((deadline - wall_clock_ms()) / 1000, 0.001))
            await asyncio.sleep(delay)

    async def _compact_forever(self) -> None:
        while True:
            try:
                await self.compact_once()
            except KvError as error:
                log.warning("history compaction: %s", error)
            await asyncio.sleep(_COMPACT_EVERY_S)
