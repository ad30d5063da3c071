"""The SQLite store's batching: a transaction in one trip to the writer's worker, Gets read together.

What the store contract cannot see from outside: a batch whose statement fails is rolled back
whole (sqlitedict's worker goes on with the next queued statement after an error, so a COMMIT
queued behind a failed statement would commit the rest of the batch), the store keeps serving
after a failure, and concurrent Gets share one statement on the reader.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvserver.domain import (
    DeleteOp,
    PutOp,
    PutResult,
    StorageFailure,
    wall_clock_ms,
)
from kvserver.store.cache import CachedStore
from kvserver.store.planner import BatchPlan
from kvserver.store.sqlite import SqliteStore, rows
from kvserver.store.sqlite import store as sqlite_store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(str(tmp_path / "kv.db"))
    try:
        yield opened
    finally:
        await opened.close()


def committed(path: Path) -> tuple[int, list[str], int]:
    """What the file holds, read with the standard library: revision, keys, events."""
    with sqlite3.connect(path) as connection:
        revision = connection.execute("SELECT value FROM kv_state WHERE name = 'revision'").fetchone()[0]
        keys = [row[0] for row in connection.execute("SELECT key FROM kv ORDER BY key")]
        events = connection.execute("SELECT COUNT(*) FROM kv_events").fetchone()[0]
    return int(revision), keys, int(events)


def failing_after_first(
    real: Any,
) -> Any:
    """_plan_statements with a failing statement after the first one: the statements after it
    (the row upserts, the revision) still run inside the transaction."""

    def statements(plan: BatchPlan, now_ms: int) -> list[tuple[str, list[Any]]]:
        planned: list[tuple[str, list[Any]]] = real(plan, now_ms)
        return [planned[0], ("INSERT INTO no_such_table VALUES (?)", [1]), *planned[1:]]

    return statements


async def test_a_failing_statement_never_commits_the_rest_of_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(str(tmp_path / "kv.db"))
    try:
        await store.write(PutOp("before", b"0"))
        monkeypatch.setattr(sqlite_store, "plan_statements", failing_after_first(rows.plan_statements))
        writes = [store.write(PutOp(f"k{index}", b"v")) for index in range(5)]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert all(isinstance(outcome, StorageFailure) for outcome in outcomes), outcomes
        assert store.revision == 1
        assert committed(tmp_path / "kv.db") == (1, ["before"], 1)
        assert (await store.get("k0", wall_clock_ms()))[1] is None

        # The worker is still serving, and no transaction was left open.
        monkeypatch.undo()
        result = await store.write(PutOp("after", b"1"))
        assert isinstance(result, PutResult)
        assert result.revision == 2
    finally:
        await store.close()
    assert committed(tmp_path / "kv.db") == (2, ["after", "before"], 2)


async def test_a_failing_prefetch_fails_its_batch_and_the_next_batch_works(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bad_range_query(*_: object) -> tuple[str, list[Any]]:
        return "SELECT * FROM no_such_table", []

    monkeypatch.setattr(rows, "range_query", bad_range_query)
    outcomes = await asyncio.gather(
        store.write(DeleteOp("p/", prefix=True)), store.write(PutOp("k", b"v")), return_exceptions=True
    )
    assert all(isinstance(outcome, StorageFailure) for outcome in outcomes), outcomes
    assert store.revision == 0
    result = await store.write(PutOp("k", b"v"))
    assert isinstance(result, PutResult)
    assert result.revision == 1


async def test_an_unexpected_error_while_planning_fails_only_its_batch(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_plan(*_: object) -> BatchPlan:
        raise RuntimeError("planner bug")

    monkeypatch.setattr(sqlite_store, "plan_batch", broken_plan)
    with pytest.raises(StorageFailure, match="planner bug"):
        await store.write(PutOp("k", b"v"))
    monkeypatch.undo()
    result = await store.write(PutOp("k", b"v"))
    assert isinstance(result, PutResult)
    assert result.revision == 1


async def test_writes_that_arrive_together_share_a_commit(store: SqliteStore) -> None:
    commits: list[int] = []
    store.commit_observers.append(lambda writes, _: commits.append(writes))
    results = await asyncio.gather(*(store.write(PutOp(f"k{index % 7}", b"v")) for index in range(50)))
    assert [result.revision for result in results] == list(range(1, 51))  # type: ignore[union-attr]
    assert sum(commits) == 50
    assert len(commits) < 50
    assert store.batches == len(commits)


async def test_close_waits_for_the_writes_already_queued(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "kv.db"))
    writes = [asyncio.ensure_future(store.write(PutOp(f"k{index}", b"v"))) for index in range(100)]
    await asyncio.sleep(0)
    await store.close()
    assert all(write.done() and not write.exception() for write in writes)
    with pytest.raises(StorageFailure):
        await store.write(PutOp("late", b"v"))
    assert committed(tmp_path / "kv.db")[0] == 100


async def test_concurrent_gets_share_reader_statements_and_see_acknowledged_writes(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(20):
        await store.write(PutOp(f"k{index}", bytes([index])))
    reader = store._reader
    assert reader is not None
    statements: list[int] = []
    enqueue = reader.enqueue

    def counting(sql: str, args: Sequence[Any], on_end: Any) -> None:
        statements.append(len(args))
        enqueue(sql, args, on_end)

    monkeypatch.setattr(reader, "enqueue", counting)
    keys = [f"k{index % 25}" for index in range(200)]  # repeats, and 5 absent keys
    results = await asyncio.gather(*(store.get(key, wall_clock_ms()) for key in keys))
    for key, (revision, entry) in zip(keys, results, strict=True):
        assert revision == 20
        index = int(key[1:])
        if index < 20:
            assert entry is not None
            assert entry.key == key
            assert entry.value == bytes([index])
        else:
            assert entry is None
    assert len(statements) <= 3, statements  # not one per Get

    # A Get called after a write was acknowledged sees it, even with other Gets in flight.
    in_flight = [asyncio.ensure_future(store.get(f"k{index}", wall_clock_ms())) for index in range(20)]
    await asyncio.sleep(0)
    await store.write(PutOp("k3", b"new"))
    revision, entry = await store.get("k3", wall_clock_ms())
    assert revision == 21
    assert entry is not None
    assert entry.value == b"new"
    await asyncio.gather(*in_flight)


async def test_a_failing_get_statement_fails_only_its_gets(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.write(PutOp("k", b"v"))
    monkeypatch.setattr(sqlite_store, "_GET_SQL", "SELECT * FROM no_such_table WHERE key IN ({})")
    with pytest.raises(StorageFailure):
        await store.get("k", wall_clock_ms())
    monkeypatch.undo()
    assert (await store.get("k", wall_clock_ms()))[1] is not None


async def test_the_cache_never_keeps_a_value_read_before_a_concurrent_write(tmp_path: Path) -> None:
    inner = await SqliteStore.open(str(tmp_path / "kv.db"))
    store = CachedStore(inner, 100)
    try:
        await store.write(PutOp("k", b"old"))
        for _ in range(20):
            read = asyncio.ensure_future(store.get("k", wall_clock_ms()))
            written = await store.write(PutOp("k", b"new"))
            await read
            revision, entry = await store.get("k", wall_clock_ms())
            assert entry is not None
            assert entry.value == b"new"
            assert isinstance(written, PutResult)
            assert revision >= written.revision
            await store.write(PutOp("k", b"old"))
    finally:
        await store.close()
