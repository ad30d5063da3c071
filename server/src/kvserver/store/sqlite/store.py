"""SqliteStore: the group committer, the batched Gets and the snapshot reads (see the package)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvserver.domain import (
    Compacted,
    Entry,
    Event,
    FutureRevision,
    KeyRange,
    KvError,
    Page,
    StorageFailure,
    StoreStats,
    WriteOp,
    WriteResult,
    wall_clock_ms,
)
from kvserver.store.base import EventListener, write_outcomes
from kvserver.store.planner import BatchPlan, plan_batch
from kvserver.store.sqlite.connection import Connection, storage_failure
from kvserver.store.sqlite.rows import (
    COMPACTED,
    SCHEMA,
    Prefetch,
    entry_from_row,
    event_from_row,
    plan_statements,
    snapshot_entry,
    snapshot_query,
)

log = logging.getLogger(__name__)

SyncMode = Literal["full", "normal"]

_MAX_BATCH = 512
# The Gets read together: the revision, and one row per key found (all from one snapshot).
_MAX_GETS = 512
_GET_SQL = (
    "SELECT s.value, kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, "
    "kv.expire_at_ms, kv.content_type FROM kv_state s LEFT JOIN kv ON kv.key IN ({}) "
    "WHERE s.name = 'revision'"
)


@dataclass
class _Pending:
    op: WriteOp
    future: asyncio.Future[WriteResult]


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: str, *, sync: SyncMode = "full") -> None:
        self._path = path
        self._sync = sync
        self._writer: Connection | None = None
        self._reader: Connection | None = None
        self._revision = 0
        self._compact_revision = 0
        self._listeners: list[EventListener] = []
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        # Gets waiting for the reader, by key, and whether a read of them is in flight (loop).
        self._gets: dict[str, list[asyncio.Future[tuple[int, Entry | None]]]] = {}
        self._gets_in_flight = False
        self.batches = 0
        self.batched_writes = 0
        # Called after every commit with (writes in the batch, seconds the COMMIT took: the fsync
        # in sync mode "full"). The metrics read them; the store knows nothing of how.
        self.commit_observers: list[Callable[[int, float], None]] = []

    @classmethod
    async def open(cls, path: str, *, sync: SyncMode = "full") -> SqliteStore:
        store = cls(path, sync=sync)
        await store._open()
        return store

    async def _open(self) -> None:
        self._writer = await asyncio.to_thread(Connection.create, self._path)
        await self._writer.query(f"PRAGMA synchronous={self._sync.upper()}")
        tables = {
            row[0] for row in await self._writer.query("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "kv_state" not in tables:
            await self._migrate()
        state = dict(await self._writer.query("SELECT name, value FROM kv_state"))
        self._revision = int(state["revision"])
        self._compact_revision = int(state["compact_revision"])
        self._reader = await asyncio.to_thread(Connection, self._path, read_only=True)
        log.info(
            "opened sqlite store %s at revision %d (synchronous=%s)", self._path, self._revision, self._sync
        )

    async def _migrate(self) -> None:
        writer = self._require(self._writer)
        await writer.query("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                await writer.query(statement)
            await writer.query("COMMIT")
        except StorageFailure:
            await _rollback(writer)
            raise

    @staticmethod
    def _require(connection: Connection | None) -> Connection:
        if connection is None:
            raise StorageFailure("the store is closed")
        return connection

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # Reads.

    async def get(self, key: str, now_ms: int, *, serializable: bool = False) -> tuple[int, Entry | None]:
        self._require(self._reader)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, Entry | None]] = loop.create_future()
        waiting = self._gets.get(key)
        if waiting is None:
            self._gets[key] = [future]
        else:
            waiting.append(future)
        if not self._gets_in_flight:
            # On the next turn of the loop, so that the Gets of this turn go in together.
            self._gets_in_flight = True
            loop.call_soon(self._read_gets, loop)
        revision, entry = await future
        if entry is not None and entry.expired(now_ms):
            entry = None
        return revision, entry

    def _read_gets(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read every waiting Get (up to _MAX_GETS keys) with one statement on the reader: one
        trip to its worker thread for all of them. The Gets that arrive meanwhile wait for the
        next. Each statement starts after its Gets were called, so it sees every write
        acknowledged before them."""
        if not self._gets:
            self._gets_in_flight = False
            return
        keys = list(itertools.islice(self._gets, _MAX_GETS))
        batch = {key: self._gets.pop(key) for key in keys}
        if self._reader is None:
            self._gets_in_flight = False
            _fail_gets(batch, StorageFailure("the store is closed"))
            return
        # Padded to a power of two (IN ignores the repeats) so that few distinct statements
        # reach sqlite3's statement cache.
        width = 1 << (len(keys) - 1).bit_length()

        def read(rows: list[tuple[Any, ...]], error: Any) -> None:  # on the reader's worker thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(self._answer_gets, loop, batch, rows, error)

        self._reader.enqueue(
            _GET_SQL.format(",".join("?" * width)), keys + keys[-1:] * (width - len(keys)), read
        )

    def _answer_gets(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: dict[str, list[asyncio.Future[tuple[int, Entry | None]]]],
        rows: list[tuple[Any, ...]],
        error: Any,
    ) -> None:
        if error is not None:
            _fail_gets(batch, storage_failure(error))
        else:
            revision = int(rows[0][0])
            found = {row[1]: entry_from_row(row[1:]) for row in rows if row[1] is not None}
            for key, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result((revision, found.get(key)))
        self._read_gets(loop)

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
        entries: list[Entry] = []
        cursor = after
        while len(entries) <= limit:
            want = limit + 1 - len(entries)
            rows = await self._snapshot_rows(keys, revision, cursor, want, keys_only)
            for row in rows:
                entry = snapshot_entry(row)
                if entry is not None and not entry.expired(now_ms):
                    entries.append(entry)
            if len(rows) < want:
                break
            cursor = rows[-1][0]
        return Page(revision, tuple(entries[:limit]), more=len(entries) > limit)

    async def count(self, keys: KeyRange, *, revision: int, now_ms: int) -> int:
        rows = await self._snapshot_rows(keys, revision, None, None, keys_only=True)
        entries = (snapshot_entry(row) for row in rows)
        return sum(1 for entry in entries if entry is not None and not entry.expired(now_ms))

    async def _snapshot_rows(
        self, keys: KeyRange, revision: int, after: str | None, limit: int | None, keys_only: bool
    ) -> list[tuple[Any, ...]]:
        sql, args = snapshot_query(keys, revision, after, limit, keys_only=keys_only)
        rows = await self._require(self._reader).query(sql, args)
        self._check_snapshot(rows, revision)
        return rows

    def _check_snapshot(self, rows: list[tuple[Any, ...]], revision: int) -> None:
        if revision > self._revision:
            raise FutureRevision(revision, self._revision)
        compact_revision = max(self._compact_revision, rows[0][COMPACTED] if rows else 0)
        if revision < compact_revision:
            raise Compacted(revision, compact_revision)

    async def events(
        self, keys: KeyRange, *, start_revision: int, end_revision: int, limit: int
    ) -> list[Event]:
        end_clause, end_args = ("AND key < ?", [keys.end]) if keys.end is not None else ("", [])
        rows = await self._require(self._reader).query(
            f"""SELECT (SELECT value FROM kv_state WHERE name = 'compact_revision'), revision, type, key,
                       value, create_revision, version, expire_at_ms, content_type, prev_value,
                       prev_create_revision, prev_mod_revision, prev_version, prev_expire_at_ms,
                       prev_content_type
                FROM (SELECT 1) LEFT JOIN kv_events
                  ON revision >= ? AND revision <= ? AND key >= ? {end_clause}
                ORDER BY revision LIMIT ?""",
            [start_revision, end_revision, keys.start, *end_args, limit],
        )
        compact_revision = int(rows[0][0])
        if start_revision <= compact_revision:
            raise Compacted(start_revision, compact_revision)
        return [event_from_row(row[1:]) for row in rows if row[1] is not None]

    async def revision_at(self, time_ms: int) -> int:
        rows = await self._require(self._reader).query(
            "SELECT MAX(revision) FROM kv_events WHERE time_ms < ?", (time_ms,)
        )
        return int(rows[0][0] or self._compact_revision)

    async def next_expiry(self) -> int | None:
        rows = await self._require(self._reader).query(
            "SELECT MIN(expire_at_ms) FROM kv WHERE expire_at_ms > 0"
        )
        return int(rows[0][0]) if rows[0][0] is not None else None

    async def stats(self) -> StoreStats:
        rows = await self._require(self._reader).query("SELECT COUNT(*) FROM kv")
        page_rows = await self._require(self._reader).query(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        )
        return StoreStats(
            self._revision,
            self._compact_revision,
            int(rows[0][0]),
            {
                "file_bytes": int(page_rows[0][0]),
                "batches": self.batches,
                "batched_writes": self.batched_writes,
            },
        )

    async def check(self) -> None:
        if self._closed:
            raise StorageFailure("the store is closed")
        await self._require(self._reader).query("SELECT 1 FROM kv_state LIMIT 1")

    # Writes. A batch costs two trips to the writer's worker thread: its prefetch SELECTs, queued
    # together, and its transaction (see `Connection.transaction`).

    async def write(self, op: WriteOp) -> WriteResult:
        if self._closed:
            raise StorageFailure("the store is closed")
        future = self._enqueue(op, asyncio.get_running_loop())
        self._start_committer()
        return await asyncio.shield(future)

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult | KvError]:
        if self._closed:
            raise StorageFailure("the store is closed")
        if not ops:
            return []
        loop = asyncio.get_running_loop()
        futures = [self._enqueue(op, loop) for op in ops]
        self._start_committer()
        # One wait for the whole batch (a gather of futures makes no tasks); the shield keeps the
        # queued writes going if the caller is cancelled, as `write` does.
        return write_outcomes(await asyncio.shield(asyncio.gather(*futures, return_exceptions=True)))

    def _enqueue(self, op: WriteOp, loop: asyncio.AbstractEventLoop) -> asyncio.Future[WriteResult]:
        future: asyncio.Future[WriteResult] = loop.create_future()
        self._queue.append(_Pending(op, future))
        return future

    def _start_committer(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="sqlite-committer")

    async def _commit_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            try:
                plan = await self._commit([pending.op for pending in batch])
            except Exception as error:  # every waiter of the batch gets the failure
                failure = error if isinstance(error, KvError) else StorageFailure(f"storage error: {error}")
                log.error("commit of %d writes failed: %s", len(batch), failure)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(failure)
                continue
            for pending, result in zip(batch, plan.results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, KvError):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    async def _commit(self, ops: list[WriteOp]) -> BatchPlan:
        writer = self._require(self._writer)
        now = wall_clock_ms()
        prefetch = Prefetch(ops, now)
        state = prefetch.state(await writer.group(prefetch.queries) if prefetch.queries else [])
        plan = plan_batch(state, self._revision, ops, now)
        if not plan.events and plan.compact_revision is None:
            return plan
        commit_s = await writer.transaction(plan_statements(plan, now))
        self.batches += 1
        self.batched_writes += len(ops)
        for observer in self.commit_observers:
            try:
                observer(len(ops), commit_s)
            except Exception:  # an observer must never fail a committed batch
                log.exception("commit observer failed")
        self._revision = plan.revision
        if plan.compact_revision is not None:
            self._compact_revision = max(self._compact_revision, plan.compact_revision)
        if plan.events:
            for listener in self._listeners:
                listener(plan.events)
        return plan

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        for connection in (self._reader, self._writer):
            if connection is not None:
                await asyncio.to_thread(connection.close)
        self._reader = self._writer = None
        log.info(
            "closed sqlite store %s at revision %d (%d writes committed in %d batches)",
            self._path,
            self._revision,
            self.batched_writes,
            self.batches,
        )


def _fail_gets(batch: dict[str, list[asyncio.Future[Any]]], error: BaseException) -> None:
    for futures in batch.values():
        for future in futures:
            if not future.done():
                future.set_exception(error)


async def _rollback(writer: Connection) -> None:
    with contextlib.suppress(StorageFailure):  # there was no transaction left to roll back
        await writer.query("ROLLBACK")
