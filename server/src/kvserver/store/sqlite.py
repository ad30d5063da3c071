"""The durable store: one SQLite file, opened through sqlitedict.

Layout of the file:
- `kv`: sqlitedict's table (key TEXT PRIMARY KEY, value BLOB), values stored as raw bytes (never
  pickle), with the metadata columns this store adds. `SqliteDict(path, tablename="kv",
  decode=bytes)` can still read it.
- `kv_events`: the history, one row per revision, written in the same transaction as the change
  it records. Each row also keeps the key's previous state, which is what lets a listing read an
  older revision while writes go on.
- `kv_state`: the revision counters.

Writes are group-committed: the operations that arrive while a commit is in flight are applied
together in the next transaction, with one fsync, and each is acknowledged only after that
transaction is durable. All writes run on the writer connection's sqlitedict worker thread;
reads use a second connection (WAL readers never wait for the writer and see only committed
transactions). Neither connection is ever used from the event loop's thread: statements are
queued to the worker and their rows come back through a future.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlitedict import SqliteDict

from kvserver.domain import (
    Compacted,
    DeleteOp,
    Entry,
    Event,
    EventType,
    ExpireOp,
    FutureRevision,
    KeyRange,
    KvError,
    Page,
    PutOp,
    StorageFailure,
    StoreStats,
    WriteOp,
    WriteResult,
    wall_clock_ms,
)
from kvserver.store.base import EventListener
from kvserver.store.planner import BatchPlan, plan_batch

log = logging.getLogger(__name__)
# sqlitedict logs every failed statement with stacks at ERROR level; this module reports the
# failures itself, once, where it can say what they mean.
logging.getLogger("sqlitedict").setLevel(logging.CRITICAL)

SyncMode = Literal["full", "normal"]

# sqlitedict's worker puts this after the last row of every statement that has a result sink.
_END_OF_ROWS = "--no more--"
_MAX_BATCH = 512
# SQLite allows 32766 bound parameters per statement.
_ROWS_PER_INSERT = 1000
_ENTRY_COLUMNS = "key, value, create_revision, mod_revision, version, expire_at_ms, content_type"
# The Gets read together: the revision, and one row per key found (all from one snapshot).
_MAX_GETS = 512
_GET_SQL = (
    "SELECT s.value, kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, "
    "kv.expire_at_ms, kv.content_type FROM kv_state s LEFT JOIN kv ON kv.key IN ({}) "
    "WHERE s.name = 'revision'"
)

_SCHEMA = [
    "ALTER TABLE kv ADD COLUMN create_revision INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN mod_revision INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN expire_at_ms INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN content_type TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX kv_deadlines ON kv (expire_at_ms) WHERE expire_at_ms > 0",
    """CREATE TABLE kv_events (
        revision INTEGER PRIMARY KEY,
        type INTEGER NOT NULL,
        key TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        value BLOB,
        create_revision INTEGER,
        version INTEGER,
        expire_at_ms INTEGER,
        content_type TEXT,
        prev_value BLOB,
        prev_create_revision INTEGER,
        prev_mod_revision INTEGER,
        prev_version INTEGER,
        prev_expire_at_ms INTEGER,
        prev_content_type TEXT
    )""",
    "CREATE INDEX kv_events_by_key ON kv_events (key, revision)",
    "CREATE TABLE kv_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO kv_state VALUES ('revision', 0), ('compact_revision', 0), ('schema', 1)",
]


class _Sink:
    """A result sink that sqlitedict's worker thread feeds: each row, then the end marker.

    `on_end(rows, error)` runs on the worker thread right after the statement, before the worker
    takes its next request: a statement it queues there runs next. The error of the statement is
    recorded on the connection just before the end marker (the worker runs one statement at a
    time), so reading it at the end marker attributes it to this statement. sqlitedict calls the
    reference it was given to reach the sink; the sink is its own reference, so the queued request
    keeps it alive until the worker is done with it.
    """

    __slots__ = ("_connection", "_on_end", "_rows")

    def __init__(self, connection: Any, on_end: Callable[[list[tuple[Any, ...]], Any], None]) -> None:
        self._connection = connection
        self._on_end = on_end
        self._rows: list[tuple[Any, ...]] = []

    def __call__(self) -> _Sink:
        return self

    def put(self, item: Any) -> None:
        if item != _END_OF_ROWS:
            self._rows.append(item)
            return
        with self._connection._lock:
            error, self._connection.exception = self._connection.exception, None
        try:
            self._on_end(self._rows, error)
        except BaseException:  # never into sqlitedict's worker loop: it would end the thread
            log.exception("a sqlite result handler failed")


class _Group:
    """Statements queued back to back whose outcome is handled once, after the last of them ran:
    `on_end(rows of each statement, the first error or None)`, on the worker thread."""

    __slots__ = ("_count", "_error", "_on_end", "_results")

    def __init__(self, count: int, on_end: Callable[[list[list[tuple[Any, ...]]], Any], None]) -> None:
        self._on_end = on_end
        self._results: list[list[tuple[Any, ...]]] = []
        self._error: Any = None
        self._count = count

    def step(self, rows: list[tuple[Any, ...]], error: Any) -> None:
        self._results.append(rows)
        if error is not None and self._error is None:
            self._error = error
        if len(self._results) == self._count:
            self._on_end(self._results, self._error)


def _failure(error: Any) -> StorageFailure:
    """sqlitedict's recorded error (an exc_info tuple) as the store's error."""
    return StorageFailure(f"storage error: {error[1]}")


class _Connection:
    """One sqlitedict connection used asynchronously."""

    def __init__(self, path: str, *, read_only: bool) -> None:
        self._dict = SqliteDict(
            path,
            tablename="kv",
            flag="r" if read_only else "c",
            journal_mode="WAL",
            autocommit=False,
            encode=bytes,
            decode=bytes,
            outer_stack=False,
        )
        self._worker = self._dict.conn

    @classmethod
    def create(cls, path: str) -> _Connection:
        """Open the writer connection, creating the file and its directory if needed."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return cls(path, read_only=False)

    def enqueue(
        self, sql: str, args: Sequence[Any], on_end: Callable[[list[tuple[Any, ...]], Any], None]
    ) -> None:
        """Queue a statement; `on_end(rows, error)` runs on the worker thread once it has run.

        Queued directly rather than through `execute`, which first re-raises any pending error
        of the worker in the caller: that error belongs to the statement whose sink collects it.
        Any thread may call this, the worker thread included.
        """
        sink = _Sink(self._worker, on_end)
        self._worker.reqs.put((sql, tuple(args), sink, None))

    def enqueue_group(
        self,
        statements: Sequence[tuple[str, Sequence[Any]]],
        on_end: Callable[[list[list[tuple[Any, ...]]], Any], None],
    ) -> None:
        """Queue statements back to back with one handler for all of them (see `_Group`)."""
        group = _Group(len(statements), on_end)
        for sql, args in statements:
            self.enqueue(sql, args, group.step)

    def group(
        self, statements: Sequence[tuple[str, Sequence[Any]]]
    ) -> asyncio.Future[list[list[tuple[Any, ...]]]]:
        """Run statements back to back; the rows of each, or the first error, in one callback."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[tuple[Any, ...]]]] = loop.create_future()
        self.enqueue_group(
            statements, lambda results, error: _resolve_threadsafe(loop, future, results, error)
        )
        return future

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> asyncio.Future[float]:
        """BEGIN IMMEDIATE, the statements, and COMMIT only if none of them failed (else
        ROLLBACK): the worker queues the COMMIT or ROLLBACK itself, right after the last
        statement, so the transaction costs one trip to the worker and back. Resolves to the
        seconds the COMMIT took, or fails with the first error (after the ROLLBACK).

        sqlitedict's worker goes on with the next queued statement after a failed one, so a
        COMMIT queued up front would commit what the batch did before and after its failure.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()

        def roll_back(error: Any) -> None:
            # The error of the ROLLBACK itself only means that there was no transaction left.
            self.enqueue("ROLLBACK", (), lambda _, __: _resolve_threadsafe(loop, future, None, error))

        def written(_: object, error: Any) -> None:
            if error is not None:
                roll_back(error)
                return
            started = time.perf_counter()

            def committed(_: object, commit_error: Any) -> None:
                if commit_error is not None:
                    roll_back(commit_error)
                else:
                    _resolve_threadsafe(loop, future, time.perf_counter() - started, None)

            self.enqueue("COMMIT", (), committed)

        self.enqueue_group([("BEGIN IMMEDIATE", ()), *statements], written)
        return future

    def submit(self, sql: str, args: Sequence[Any] = ()) -> asyncio.Future[list[tuple[Any, ...]]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()
        self.enqueue(sql, args, lambda rows, error: _resolve_threadsafe(loop, future, rows, error))
        return future

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.submit(sql, args)

    def close(self) -> None:
        self._dict.close()


def _resolve_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: Any
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(_resolve, future, result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: Any) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(_failure(error))
    else:
        future.set_result(result)


@dataclass
class _Pending:
    op: WriteOp
    future: asyncio.Future[WriteResult]


class _Prefetched:
    """The committed state that a batch reads, fetched before it is planned."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry | None] = {}
        self.ranges: list[tuple[KeyRange, list[Entry]]] = []
        self.due_entries: list[Entry] = []

    def lookup(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def scan(self, keys: KeyRange) -> Iterable[Entry]:
        for fetched_range, entries in self.ranges:
            if fetched_range == keys:
                return entries
        raise AssertionError(f"range {keys} was not prefetched")

    def due(self, now_ms: int, limit: int) -> Iterable[Entry]:
        return [entry for entry in self.due_entries if entry.expired(now_ms)][:limit]


class _Prefetch:
    """The committed state a batch reads: the SELECTs that fetch it, and the view of their rows."""

    def __init__(self, ops: list[WriteOp], now_ms: int) -> None:
        self.keys = sorted({op.key for op in ops if isinstance(op, PutOp | DeleteOp) and not _is_prefix(op)})
        self.queries: list[tuple[str, Sequence[Any]]] = []
        for start in range(0, len(self.keys), _ROWS_PER_INSERT):
            chunk = self.keys[start : start + _ROWS_PER_INSERT]
            placeholders = ",".join("?" * len(chunk))
            self.queries.append((f"SELECT {_ENTRY_COLUMNS} FROM kv WHERE key IN ({placeholders})", chunk))
        self._key_queries = len(self.queries)
        self.prefixes = [KeyRange.prefix(op.key) for op in ops if isinstance(op, DeleteOp) and op.prefix]
        self.queries += [_range_query(keys_range) for keys_range in self.prefixes]
        expires = [op for op in ops if isinstance(op, ExpireOp)]
        expire_limit = sum(op.limit for op in expires)
        # Due by the operations' own clocks (not the batch's), in the planner's order: deadline, key.
        due_by = max((op.now_ms for op in expires), default=now_ms)
        self._due = expire_limit > 0
        if self._due:
            self.queries.append(
                (
                    f"SELECT {_ENTRY_COLUMNS} FROM kv WHERE expire_at_ms > 0 AND expire_at_ms <= ? "
                    "ORDER BY expire_at_ms, key LIMIT ?",
                    (due_by, expire_limit),
                )
            )

    def state(self, results: list[list[tuple[Any, ...]]]) -> _Prefetched:
        """The view of the committed state from the rows of `queries`, in their order."""
        state = _Prefetched()
        state.entries = dict.fromkeys(self.keys)
        rows_of = iter(results)
        for _ in range(self._key_queries):
            state.entries.update((row[0], _entry(row)) for row in next(rows_of))
        for keys_range in self.prefixes:
            state.ranges.append((keys_range, [_entry(row) for row in next(rows_of)]))
        if self._due:
            state.due_entries = [_entry(row) for row in next(rows_of)]
        for entries in [state.due_entries, *(entries for _, entries in state.ranges)]:
            state.entries.update((entry.key, entry) for entry in entries)
        return state


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: str, *, sync: SyncMode = "full") -> None:
        self._path = path
        self._sync = sync
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
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
        self._writer = await asyncio.to_thread(_Connection.create, self._path)
        await self._writer.query(f"PRAGMA synchronous={self._sync.upper()}")
        tables = {
            row[0] for row in await self._writer.query("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "kv_state" not in tables:
            await self._migrate()
        state = dict(await self._writer.query("SELECT name, value FROM kv_state"))
        self._revision = int(state["revision"])
        self._compact_revision = int(state["compact_revision"])
        self._reader = await asyncio.to_thread(_Connection, self._path, read_only=True)
        log.info(
            "opened sqlite store %s at revision %d (synchronous=%s)", self._path, self._revision, self._sync
        )

    async def _migrate(self) -> None:
        writer = self._require(self._writer)
        await writer.query("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                await writer.query(statement)
            await writer.query("COMMIT")
        except StorageFailure:
            await _rollback(writer)
            raise

    @staticmethod
    def _require(connection: _Connection | None) -> _Connection:
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
            _fail_gets(batch, _failure(error))
        else:
            revision = int(rows[0][0])
            found = {row[1]: _entry(row[1:]) for row in rows if row[1] is not None}
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
                entry = _snapshot_entry(row)
                if entry is not None and not entry.expired(now_ms):
                    entries.append(entry)
            if len(rows) < want:
                break
            cursor = rows[-1][0]
        return Page(revision, tuple(entries[:limit]), more=len(entries) > limit)

    async def count(self, keys: KeyRange, *, revision: int, now_ms: int) -> int:
        rows = await self._snapshot_rows(keys, revision, None, None, keys_only=True)
        entries = (_snapshot_entry(row) for row in rows)
        return sum(1 for entry in entries if entry is not None and not entry.expired(now_ms))

    async def _snapshot_rows(
        self, keys: KeyRange, revision: int, after: str | None, limit: int | None, keys_only: bool
    ) -> list[tuple[Any, ...]]:
        sql, args = _snapshot_query(keys, revision, after, limit, keys_only=keys_only)
        rows = await self._require(self._reader).query(sql, args)
        self._check_snapshot(rows, revision)
        return rows

    def _check_snapshot(self, rows: list[tuple[Any, ...]], revision: int) -> None:
        if revision > self._revision:
            raise FutureRevision(revision, self._revision)
        compact_revision = max(self._compact_revision, rows[0][_COMPACTED] if rows else 0)
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
        return [_event(row[1:]) for row in rows if row[1] is not None]

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
    # together, and its transaction (see `_Connection.transaction`).

    async def write(self, op: WriteOp) -> WriteResult:
        if self._closed:
            raise StorageFailure("the store is closed")
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(op, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="sqlite-committer")
        return await asyncio.shield(future)

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
        prefetch = _Prefetch(ops, now)
        state = prefetch.state(await writer.group(prefetch.queries) if prefetch.queries else [])
        plan = plan_batch(state, self._revision, ops, now)
        if not plan.events and plan.compact_revision is None:
            return plan
        commit_s = await writer.transaction(_plan_statements(plan, now))
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


def _is_prefix(op: WriteOp) -> bool:
    return isinstance(op, DeleteOp) and op.prefix


async def _rollback(writer: _Connection) -> None:
    with contextlib.suppress(StorageFailure):  # there was no transaction left to roll back
        await writer.query("ROLLBACK")


def _entry(row: Sequence[Any]) -> Entry:
    key, value, create_revision, mod_revision, version, expire_at_ms, content_type = row
    return Entry(key, bytes(value or b""), create_revision, mod_revision, version, expire_at_ms, content_type)


def _range_query(keys: KeyRange) -> tuple[str, list[Any]]:
    if keys.end is None:
        return f"SELECT {_ENTRY_COLUMNS} FROM kv WHERE key >= ?", [keys.start]
    return f"SELECT {_ENTRY_COLUMNS} FROM kv WHERE key >= ? AND key < ?", [keys.start, keys.end]


def _snapshot_query(
    keys: KeyRange, revision: int, after: str | None, limit: int | None, *, keys_only: bool
) -> tuple[str, list[Any]]:
    """The entries of a range as of `revision`: a key changed since then shows its state from
    before its first later change (kept with that event); any other key shows its current row."""
    lower = after if after is not None and after >= keys.start else keys.start
    lower_op = ">" if after is not None and after >= keys.start else ">="
    bounds = f"key {lower_op} ?" + (" AND key < ?" if keys.end is not None else "")
    bound_args: list[Any] = [lower] + ([keys.end] if keys.end is not None else [])
    limit_clause = "LIMIT ?" if limit is not None else ""
    value = "NULL" if keys_only else "kv.value"
    prev_value = "NULL" if keys_only else "e.prev_value"
    sql = f"""
        WITH candidates(key) AS (
            SELECT key FROM kv WHERE {bounds}
            UNION
            SELECT key FROM kv_events WHERE revision > ? AND {bounds}
            ORDER BY key {limit_clause}
        )
        SELECT c.key,
               kv.create_revision AS cur_create, kv.expire_at_ms AS cur_expire,
               e.revision AS changed,
               e.prev_create_revision AS prev_create, e.prev_expire_at_ms AS prev_expire,
               {value}, kv.mod_revision, kv.version, kv.content_type,
               {prev_value}, e.prev_mod_revision, e.prev_version, e.prev_content_type,
               (SELECT value FROM kv_state WHERE name = 'compact_revision') AS compacted
        FROM candidates c
        LEFT JOIN kv ON kv.key = c.key
        LEFT JOIN kv_events e
          ON e.revision = (SELECT MIN(revision) FROM kv_events WHERE key = c.key AND revision > ?)
        ORDER BY c.key"""
    args = [*bound_args, revision, *bound_args, *([limit] if limit is not None else []), revision]
    return sql, args


_COMPACTED = 14  # the column of a snapshot row that carries the compact revision


def _snapshot_entry(row: Sequence[Any]) -> Entry | None:
    key, create, expire, changed, p_create, p_expire, value, mod, version, c_type = row[:10]
    p_value, p_mod, p_version, p_type = row[10:14]
    if changed is None:
        if create is None:
            return None
        return Entry(key, bytes(value or b""), create, mod, version, expire, c_type)
    if p_create is None:
        return None
    return Entry(key, bytes(p_value or b""), p_create, p_mod, p_version, p_expire, p_type)


def _event(row: Sequence[Any]) -> Event:
    revision, type_, key, value, create, version, expire, c_type = row[:8]
    p_value, p_create, p_mod, p_version, p_expire, p_type = row[8:]
    event_type = EventType(type_)
    entry = None
    if event_type is EventType.PUT:
        entry = Entry(key, bytes(value or b""), create, revision, version, expire, c_type)
    prev = None
    if p_create is not None:
        prev = Entry(key, bytes(p_value or b""), p_create, p_mod, p_version, p_expire, p_type)
    return Event(event_type, revision, key, entry, prev)


def _plan_statements(plan: BatchPlan, now_ms: int) -> list[tuple[str, list[Any]]]:
    """The SQL that persists a planned batch (inside the caller's transaction)."""
    statements: list[tuple[str, list[Any]]] = []
    event_rows = [_event_row(event, now_ms) for event in plan.events]
    statements += _inserts("INSERT INTO kv_events VALUES", event_rows)
    upserts, deletes = plan.final_rows()
    entry_rows = [_entry_row(entry) for entry in upserts.values()]
    upsert = f"INSERT INTO kv ({_ENTRY_COLUMNS}) VALUES"
    statements += [
        (
            sql + " ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
            "create_revision = excluded.create_revision, mod_revision = excluded.mod_revision, "
            "version = excluded.version, expire_at_ms = excluded.expire_at_ms, "
            "content_type = excluded.content_type",
            args,
        )
        for sql, args in _inserts(upsert, entry_rows)
    ]
    deleted_keys = sorted(deletes)
    for start in range(0, len(deleted_keys), _ROWS_PER_INSERT):
        keys = deleted_keys[start : start + _ROWS_PER_INSERT]
        statements.append((f"DELETE FROM kv WHERE key IN ({','.join('?' * len(keys))})", list(keys)))
    if plan.events:
        statements.append(("UPDATE kv_state SET value = ? WHERE name = 'revision'", [plan.revision]))
    if plan.compact_revision is not None:
        statements.append(("DELETE FROM kv_events WHERE revision <= ?", [plan.compact_revision]))
        statements.append(
            (
                "UPDATE kv_state SET value = MAX(value, ?) WHERE name = 'compact_revision'",
                [plan.compact_revision],
            )
        )
    return statements


def _event_row(event: Event, now_ms: int) -> list[Any]:
    """A kv_events row: the event, the key's new state (for a PUT), its previous state (if any)."""
    new, old = event.entry, event.prev
    row: list[Any] = [event.revision, int(event.type), event.key, now_ms]
    row += (
        [new.value, new.create_revision, new.version, new.expire_at_ms, new.content_type]
        if new
        else [None] * 5
    )
    if old is None:
        return row + [None] * 6
    return [
        *row,
        old.value,
        old.create_revision,
        old.mod_revision,
        old.version,
        old.expire_at_ms,
        old.content_type,
    ]


def _entry_row(entry: Entry) -> list[Any]:
    return [
        entry.key,
        entry.value,
        entry.create_revision,
        entry.mod_revision,
        entry.version,
        entry.expire_at_ms,
        entry.content_type,
    ]


def _inserts(prefix: str, rows: list[list[Any]]) -> list[tuple[str, list[Any]]]:
    """Multi-row INSERT statements for `rows`, within SQLite's limit of bound parameters."""
    if not rows:
        return []
    width = len(rows[0])
    per_statement = max(_ROWS_PER_INSERT // width, 1)
    placeholder = "(" + ",".join("?" * width) + ")"
    statements = []
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        statements.append(
            (f"{prefix} {','.join([placeholder] * len(chunk))}", [v for row in chunk for v in row])
        )
    return statements
