"""The store contract: one suite, run unchanged against every store backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from kvserver.config import Config
from kvserver.domain import (
    Compacted,
    CompactOp,
    Condition,
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
    PutOp,
    PutResult,
    wall_clock_ms,
)
from kvserver.server import open_store
from kvserver.store.base import Store
from kvtest import STORE_CONFIGS, EtcdServer, server_config

EVERYTHING = KeyRange("", None)


@pytest.fixture(params=[*STORE_CONFIGS, "etcd"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param != "etcd":
        opened = await open_store(server_config(tmp_path, request.param))
        try:
            yield opened
        finally:
            await opened.close()
        return
    # A fresh single-member etcd per test, stopped by PID.
    if not EtcdServer.available():
        pytest.fail("etcd is not installed: run `make cluster-deps` (Debian etcd-server)")
    etcd = EtcdServer(tmp_path)
    etcd.start()
    try:
        opened = await open_store(replace(Config(), store="etcd", etcd_endpoints=etcd.endpoint))
        try:
            yield opened
        finally:
            await opened.close()
    finally:
        etcd.stop()


async def put(store: Store, key: str, value: bytes = b"v", **options: object) -> PutResult:
    result = await store.write(PutOp(key, value, **options))  # type: ignore[arg-type]
    assert isinstance(result, PutResult)
    return result


async def delete(store: Store, key: str, **options: object) -> DeleteResult:
    result = await store.write(DeleteOp(key, **options))  # type: ignore[arg-type]
    assert isinstance(result, DeleteResult)
    return result


async def get(store: Store, key: str) -> Entry | None:
    return (await store.get(key, wall_clock_ms()))[1]


async def keys_at(store: Store, revision: int, keys: KeyRange = EVERYTHING) -> list[str]:
    page = await store.range(
        keys, revision=revision, after=None, limit=1000, keys_only=True, now_ms=wall_clock_ms()
    )
    return [entry.key for entry in page.entries]


async def test_an_empty_store_is_at_revision_zero(store: Store) -> None:
    assert store.revision == 0
    assert await store.get("missing", wall_clock_ms()) == (0, None)


async def test_put_creates_then_replaces_with_revisions_and_versions(store: Store) -> None:
    created = await put(store, "a", b"1")
    assert (created.revision, created.created, created.prev) == (1, True, None)
    assert created.entry == Entry("a", b"1", create_revision=1, mod_revision=1, version=1)
    await put(store, "b")
    replaced = await put(store, "a", b"2")
    assert (replaced.revision, replaced.created) == (3, False)
    assert replaced.entry == Entry("a", b"2", create_revision=1, mod_revision=3, version=2)
    assert replaced.prev == created.entry
    assert await store.get("a", wall_clock_ms()) == (3, replaced.entry)


async def test_values_are_bytes_and_keys_are_unicode(store: Store) -> None:
    await put(store, "ключ/🔑 key", b"\x00\xff binary")
    entry = await get(store, "ключ/🔑 key")
    assert entry is not None
    assert entry.value == b"\x00\xff binary"


@pytest.mark.parametrize(
    ("condition", "exists", "holds"),
    [
        (Condition(must_not_exist=True), False, True),
        (Condition(must_not_exist=True), True, False),
        (Condition(must_exist=True), True, True),
        (Condition(must_exist=True), False, False),
        (Condition(mod_revision=1), True, True),
        (Condition(mod_revision=2), True, False),
        (Condition(mod_revision=1), False, False),
        (Condition(version=1), True, True),
        (Condition(version=2), True, False),
    ],
)
async def test_conditional_put(store: Store, condition: Condition, exists: bool, holds: bool) -> None:
    if exists:
        await put(store, "k", b"old")
    revision = store.revision
    if holds:
        result = await put(store, "k", b"new", condition=condition)
        assert result.revision == revision + 1
        assert (await get(store, "k")) == result.entry
    else:
        with pytest.raises(ConditionFailed, match="'k'"):
            await put(store, "k", b"new", condition=condition)
        assert store.revision == revision
        entry = await get(store, "k")
        assert (entry.value if entry else None) == (b"old" if exists else None)


async def test_delete_one_key(store: Store) -> None:
    await put(store, "a", b"1")
    result = await delete(store, "a")
    assert result.revision == 2
    assert [entry.key for entry in result.deleted] == ["a"]
    assert await get(store, "a") is None
    recreated = await put(store, "a", b"again")
    assert recreated.entry.create_revision == 3
    assert recreated.entry.version == 1


async def test_delete_of_an_absent_key(store: Store) -> None:
    with pytest.raises(KeyNotFound, match="'nope'"):
        await delete(store, "nope")
    assert (await delete(store, "nope", allow_missing=True)).deleted == ()
    assert store.revision == 0


async def test_conditional_delete(store: Store) -> None:
    await put(store, "a")
    with pytest.raises(ConditionFailed):
        await delete(store, "a", condition=Condition(mod_revision=7))
    assert await get(store, "a") is not None
    await delete(store, "a", condition=Condition(mod_revision=1))
    assert await get(store, "a") is None


async def test_delete_prefix_uses_one_revision_per_key(store: Store) -> None:
    for key in ("app/a", "app/b", "app/c", "apple", "other"):
        await put(store, key)
    result = await delete(store, "app/", prefix=True)
    assert [entry.key for entry in result.deleted] == ["app/a", "app/b", "app/c"]
    assert result.revision == 8
    assert await keys_at(store, store.revision) == ["apple", "other"]
    assert (await delete(store, "none/", prefix=True)).deleted == ()


async def test_range_is_in_byte_order_and_bounded(store: Store) -> None:
    for key in ("b", "a", "ab", "é", "z", "a/1", "a/2"):
        await put(store, key, key.encode())
    assert await keys_at(store, store.revision) == ["a", "a/1", "a/2", "ab", "b", "z", "é"]
    assert await keys_at(store, store.revision, KeyRange.prefix("a/")) == ["a/1", "a/2"]
    assert await keys_at(store, store.revision, KeyRange("ab", "z")) == ["ab", "b"]


async def test_range_pages_with_after_and_limit(store: Store) -> None:
    for index in range(25):
        await put(store, f"k{index:02d}", b"x")
    seen: list[str] = []
    after = None
    for _ in range(10):
        page = await store.range(
            EVERYTHING,
            revision=store.revision,
            after=after,
            limit=10,
            keys_only=False,
            now_ms=wall_clock_ms(),
        )
        seen += [entry.key for entry in page.entries]
        assert all(entry.value == b"x" for entry in page.entries)
        if not page.more:
            break
        after = page.entries[-1].key
    assert seen == [f"k{index:02d}" for index in range(25)]


async def test_range_reads_an_older_revision_while_writes_go_on(store: Store) -> None:
    await put(store, "a", b"a1")
    await put(store, "b", b"b1")
    await put(store, "c", b"c1")
    snapshot = store.revision
    await put(store, "a", b"a2")
    await delete(store, "b")
    await put(store, "bb", b"new")
    page = await store.range(
        EVERYTHING, revision=snapshot, after=None, limit=10, keys_only=False, now_ms=wall_clock_ms()
    )
    assert [(entry.key, entry.value) for entry in page.entries] == [("a", b"a1"), ("b", b"b1"), ("c", b"c1")]
    assert await store.count(EVERYTHING, revision=snapshot, now_ms=wall_clock_ms()) == 3
    assert await store.count(EVERYTHING, revision=store.revision, now_ms=wall_clock_ms()) == 3
    assert await keys_at(store, store.revision) == ["a", "bb", "c"]


async def test_events_replay_history_in_revision_order(store: Store) -> None:
    await put(store, "a", b"1")
    await put(store, "b", b"2")
    await put(store, "a", b"3")
    await delete(store, "a")
    events = await store.events(EVERYTHING, start_revision=2, end_revision=store.revision, limit=100)
    assert [(event.type, event.revision, event.key) for event in events] == [
        (EventType.PUT, 2, "b"),
        (EventType.PUT, 3, "a"),
        (EventType.DELETE, 4, "a"),
    ]
    assert events[1].prev is not None
    assert events[1].prev.value == b"1"
    assert events[2].entry is None
    only_a = await store.events(KeyRange.single("a"), start_revision=1, end_revision=3, limit=100)
    assert [event.revision for event in only_a] == [1, 3]


async def test_compaction_discards_history(store: Store) -> None:
    for index in range(5):
        await put(store, f"k{index}")
    await store.write(CompactOp(3))
    assert store.compact_revision == 3
    with pytest.raises(Compacted):
        await store.events(EVERYTHING, start_revision=3, end_revision=5, limit=10)
    assert [
        event.revision for event in await store.events(EVERYTHING, start_revision=4, end_revision=5, limit=10)
    ] == [4, 5]
    with pytest.raises(Compacted):
        await store.range(
            EVERYTHING, revision=2, after=None, limit=10, keys_only=True, now_ms=wall_clock_ms()
        )


async def test_expired_keys_are_invisible_and_reaped_with_expire_events(store: Store) -> None:
    now = wall_clock_ms()
    await put(store, "short", expire_at_ms=now + 50)
    await put(store, "long", expire_at_ms=now + 60_000)
    assert await store.next_expiry() == now + 50
    await asyncio.sleep(0.1)
    assert await get(store, "short") is None
    assert await keys_at(store, store.revision) == ["long"]
    result = await store.write(ExpireOp(wall_clock_ms(), 100))
    assert isinstance(result, ExpireResult)
    assert result.expired == 1
    events = await store.events(EVERYTHING, start_revision=3, end_revision=store.revision, limit=10)
    assert [(event.type, event.key) for event in events] == [(EventType.EXPIRE, "short")]


async def test_a_put_over_an_expired_key_expires_it_first(store: Store) -> None:
    await put(store, "k", expire_at_ms=wall_clock_ms() + 20)
    await asyncio.sleep(0.05)
    result = await put(store, "k", b"fresh", condition=Condition(must_not_exist=True))
    assert result.created
    assert result.revision == 3
    events = await store.events(EVERYTHING, start_revision=2, end_revision=3, limit=10)
    assert [event.type for event in events] == [EventType.EXPIRE, EventType.PUT]


async def test_concurrent_writes_get_consecutive_revisions(store: Store) -> None:
    results = await asyncio.gather(*(put(store, f"k{index}") for index in range(200)))
    assert sorted(result.revision for result in results) == list(range(1, 201))
    assert (await store.stats()).key_count == 200


async def test_listeners_see_every_event_in_order_before_the_ack(store: Store) -> None:
    heard: list[Event] = []

    def listen(events: Sequence[Event]) -> None:
        heard.extend(events)

    store.add_listener(listen)
    result = await put(store, "a")
    assert [event.revision for event in heard] == [result.revision]
    await asyncio.gather(*(put(store, f"k{index}") for index in range(50)))
    await delete(store, "k", prefix=True)
    assert [event.revision for event in heard] == list(range(1, store.revision + 1))


def in_submission_order(store: Store) -> bool:
    """Whether the store applies the ops of one write_many in their order (etcd does not)."""
    return store.name != "etcd"


async def test_write_many_applies_each_op_with_its_own_revision(store: Store) -> None:
    await put(store, "before")
    ops = [PutOp(f"k{index}", bytes([index])) for index in range(20)]
    results = await store.write_many(ops)
    assert all(isinstance(result, PutResult) for result in results)
    revisions = [result.revision for result in results if isinstance(result, PutResult)]
    if in_submission_order(store):
        assert revisions == list(range(2, 22))
    else:
        assert sorted(revisions) == list(range(2, 22))
    assert store.revision == 21
    for index, result in enumerate(results):
        assert isinstance(result, PutResult)
        assert result.entry == Entry(f"k{index}", bytes([index]), result.revision, result.revision, 1)
        assert await get(store, f"k{index}") == result.entry


async def test_write_many_puts_a_failed_op_in_its_place_and_applies_the_others(store: Store) -> None:
    await put(store, "taken", b"old")
    await put(store, "kept", b"one")
    await get(store, "kept")  # cached by a caching store: the write must replace it
    results = await store.write_many(
        [
            PutOp("first", b"1"),
            PutOp("kept", b"two"),
            PutOp("taken", b"new", condition=Condition(must_not_exist=True)),
            DeleteOp("absent"),
            PutOp("last", b"3"),
        ]
    )
    assert [type(result) for result in results] == [
        PutResult,
        PutResult,
        ConditionFailed,
        KeyNotFound,
        PutResult,
    ]
    applied = [result.revision for result in results if isinstance(result, PutResult)]
    assert sorted(applied) == [3, 4, 5]
    if in_submission_order(store):
        assert applied == [3, 4, 5]
    assert store.revision == 5
    for key, result in zip(("first", "kept", "last"), (results[0], results[1], results[4]), strict=True):
        assert isinstance(result, PutResult)
        assert await get(store, key) == result.entry
    kept = await get(store, "kept")
    assert kept is not None
    assert (kept.value, kept.version) == (b"two", 2)
    taken = await get(store, "taken")
    assert taken is not None
    assert (taken.value, taken.mod_revision) == (b"old", 1)


async def test_write_many_of_nothing_returns_nothing(store: Store) -> None:
    assert await store.write_many([]) == []
    assert store.revision == 0


async def test_listeners_see_every_op_of_write_many_in_revision_order(store: Store) -> None:
    heard: list[Event] = []

    def listen(events: Sequence[Event]) -> None:
        heard.extend(events)

    store.add_listener(listen)
    await put(store, "taken")
    results = await store.write_many(
        [PutOp(f"k{index}", b"v") for index in range(10)]
        + [PutOp("taken", b"again", condition=Condition(must_not_exist=True))]
        + [PutOp(f"m{index}", b"v") for index in range(10)]
    )
    assert isinstance(results[10], ConditionFailed)
    assert [event.revision for event in heard] == list(range(1, 22))
    written = {result.revision: result.entry for result in results if isinstance(result, PutResult)}
    assert {event.revision: event.entry for event in heard[1:]} == written
