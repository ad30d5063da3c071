"""What the etcd store adds to the store contract (tests/unit/store runs that over etcd too):
the envelope, deletions versus expiries, several kv servers over one etcd, foreign values,
prefixes and compaction by another server. Each test gets a fresh single-member etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import grpc
import pytest
from aetcd import rpc  # type: ignore[import-untyped]

from kvserver.domain import (
    NO_EXPIRY,
    Compacted,
    CompactOp,
    DeleteOp,
    Event,
    EventType,
    ExpireOp,
    KeyRange,
    PutOp,
    PutResult,
    StorageFailure,
    wall_clock_ms,
)
from kvserver.store.etcd import Envelope, EnvelopeError, EtcdStore, decode_envelope, encode_envelope
from kvtest import EtcdServer

EVERYTHING = KeyRange("", None)
OpenStore = Callable[..., AbstractAsyncContextManager[EtcdStore]]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    if not EtcdServer.available():
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    server = EtcdServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def open_store(etcd: EtcdServer) -> OpenStore:
    @asynccontextmanager
    async def opened(prefix: str = "kv/") -> AsyncIterator[EtcdStore]:
        store = await EtcdStore.open(etcd.endpoint, prefix=prefix)
        try:
            yield store
        finally:
            await store.close()

    return opened


def raw_put(etcd: EtcdServer, key: bytes, value: bytes) -> None:
    with grpc.insecure_channel(etcd.endpoint) as channel:
        rpc.KVStub(channel).Put(rpc.PutRequest(key=key, value=value), timeout=5)


def listen(store: EtcdStore) -> list[Event]:
    heard: list[Event] = []

    def listener(events: Sequence[Event]) -> None:
        heard.extend(events)

    store.add_listener(listener)
    return heard


def test_the_envelope_round_trips_and_has_the_documented_layout() -> None:
    data = encode_envelope(b"\x00value", 1_700_000_000_123, "text/plain")
    assert data[0] == 1
    assert int.from_bytes(data[1:9], "big") == 1_700_000_000_123
    assert int.from_bytes(data[9:11], "big") == len("text/plain")
    assert data[11:21] == b"text/plain"
    assert data[21:] == b"\x00value"
    assert decode_envelope(data) == Envelope(b"\x00value", 1_700_000_000_123, "text/plain")
    assert decode_envelope(encode_envelope(b"")) == Envelope(b"", NO_EXPIRY, "")


@pytest.mark.parametrize("foreign", [b"", b"hello", b"\x00\x01", b"\xff" * 20, b"{}"])
def test_values_kv_did_not_write_are_plain_values(foreign: bytes) -> None:
    assert decode_envelope(foreign) == Envelope(foreign)


@pytest.mark.parametrize(
    "bad",
    [
        b"\x02" + b"\x00" * 20,  # a newer format
        b"\x1f",
        b"\x01\x00\x00",  # truncated header
        b"\x01" + b"\x00" * 8 + b"\x00\x05abc",  # content type runs past the end
        b"\x01" + b"\x00" * 8 + b"\x00\x02\xff\xfe",  # content type not UTF-8
    ],
)
def test_unreadable_envelopes_are_errors_not_misreadings(bad: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(bad)


async def test_a_client_delete_of_a_ttl_key_is_a_delete_and_a_reaped_key_an_expire(
    open_store: OpenStore,
) -> None:
    async with open_store() as store:
        heard = listen(store)
        await store.write(PutOp("deleted", b"v", expire_at_ms=wall_clock_ms() + 60_000))
        await store.write(DeleteOp("deleted"))
        await store.write(PutOp("reaped", b"v", expire_at_ms=wall_clock_ms() + 30))
        await asyncio.sleep(0.06)
        await store.write(PutOp("plain", b"v"))
        await store.write(DeleteOp("plain"))
        await store.write(PutOp("prefix/ttl", b"v", expire_at_ms=wall_clock_ms() + 60_000))
        await store.write(DeleteOp("prefix/", prefix=True))
        await store.write(ExpireOp(wall_clock_ms(), 10))
        expected = [
            (EventType.PUT, "deleted"),
            (EventType.DELETE, "deleted"),
            (EventType.PUT, "reaped"),
            (EventType.PUT, "plain"),
            (EventType.DELETE, "plain"),
            (EventType.PUT, "prefix/ttl"),
            (EventType.DELETE, "prefix/ttl"),
            (EventType.EXPIRE, "reaped"),
        ]
        assert [(event.type, event.key) for event in heard] == expected
        assert [event.revision for event in heard] == list(range(1, 9))
        replayed = await store.events(EVERYTHING, start_revision=1, end_revision=store.revision, limit=100)
        assert replayed == heard


@pytest.mark.slow
async def test_etcd_removes_an_expired_key_by_its_lease_as_an_expire(open_store: OpenStore) -> None:
    """No kv reaper runs here: the key's lease (its TTL rounded up, plus a second) removes it."""
    async with open_store() as store:
        heard = listen(store)
        await store.write(PutOp("leased", b"v", expire_at_ms=wall_clock_ms() + 100))
        for _ in range(100):
            if len(heard) == 2:
                break
            await asyncio.sleep(0.05)
        assert [(event.type, event.key, event.revision) for event in heard] == [
            (EventType.PUT, "leased", 1),
            (EventType.EXPIRE, "leased", 2),
        ]
        assert await store.next_expiry() is None


async def test_two_servers_share_one_etcd(open_store: OpenStore) -> None:
    async with open_store() as first, open_store() as second:
        heard = listen(second)
        written = await first.write(PutOp("k", b"from the first", content_type="text/plain"))
        assert isinstance(written, PutResult)
        # Linearizable: the other server reads it at once; its watch delivers it shortly.
        assert await second.get("k", wall_clock_ms()) == (written.revision, written.entry)
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert [(event.type, event.entry) for event in heard] == [(EventType.PUT, written.entry)]
        assert second.revision == first.revision == 1
        # A change through the second server; the first still reads the older snapshot.
        await second.write(PutOp("k", b"from the second"))
        page = await first.range(
            EVERYTHING,
            revision=written.revision,
            after=None,
            limit=10,
            keys_only=False,
            now_ms=wall_clock_ms(),
        )
        assert [entry.value for entry in page.entries] == [b"from the first"]


async def test_compaction_by_another_server_is_compacted_here(open_store: OpenStore) -> None:
    async with open_store() as first, open_store() as second:
        for index in range(6):
            await first.write(PutOp(f"k{index}", b"v"))
        for _ in range(100):
            if second.revision == 6:
                break
            await asyncio.sleep(0.01)
        await first.write(CompactOp(4))
        with pytest.raises(Compacted) as compacted:
            await second.range(
                EVERYTHING, revision=2, after=None, limit=10, keys_only=True, now_ms=wall_clock_ms()
            )
        assert compacted.value.compact_revision == 4
        assert second.compact_revision == 4
        with pytest.raises(Compacted):
            await second.events(EVERYTHING, start_revision=4, end_revision=6, limit=10)
        assert [
            event.revision
            for event in await second.events(EVERYTHING, start_revision=5, end_revision=6, limit=10)
        ] == [5, 6]
    async with open_store() as third:  # a server started later finds the compact revision
        assert third.compact_revision == 4


async def test_foreign_values_and_other_prefixes(etcd: EtcdServer, open_store: OpenStore) -> None:
    raw_put(etcd, b"kv/written-by-etcdctl", b"plain bytes")
    raw_put(etcd, b"kv/newer-format", b"\x05future")
    raw_put(etcd, b"other/app", b"not kv's")
    async with open_store() as store, open_store("tenant-b/") as other:
        entry = (await store.get("written-by-etcdctl", wall_clock_ms()))[1]
        assert entry is not None
        assert (entry.value, entry.expire_at_ms, entry.content_type) == (b"plain bytes", NO_EXPIRY, "")
        with pytest.raises(StorageFailure, match="newer-format"):
            await store.get("newer-format", wall_clock_ms())
        await other.write(PutOp("b-key", b"v"))
        page = await store.range(
            KeyRange("w", "x"),
            revision=store.revision,
            after=None,
            limit=10,
            keys_only=True,
            now_ms=wall_clock_ms(),
        )
        assert [entry.key for entry in page.entries] == ["written-by-etcdctl"]
        assert (await other.get("written-by-etcdctl", wall_clock_ms()))[1] is None
        assert (await store.stats()).key_count == 2
        assert (await other.stats()).key_count == 1


async def test_history_compacted_exactly_at_the_start_by_another_server_is_compacted(
    open_store: OpenStore,
) -> None:
    """etcd accepts a watch from its compact revision but drops a deletion at exactly that
    revision: the replay must say Compacted rather than silently skip it."""
    async with open_store() as first, open_store() as second:
        await first.write(PutOp("k", b"v"))
        await first.write(DeleteOp("k"))
        await first.write(PutOp("j", b"v"))
        for _ in range(100):
            if second.revision == 3:
                break
            await asyncio.sleep(0.01)
        await first.write(CompactOp(2))
        assert second.compact_revision == 0  # it has not heard of the compaction
        with pytest.raises(Compacted):
            await second.events(EVERYTHING, start_revision=2, end_revision=3, limit=10)
        assert second.compact_revision == 2
        assert [
            (event.type, event.key)
            for event in await second.events(EVERYTHING, start_revision=3, end_revision=3, limit=10)
        ] == [(EventType.PUT, "j")]


async def test_deadlines_beyond_etcds_longest_lease(open_store: OpenStore) -> None:
    year_9999 = 253_402_300_799_999
    async with open_store() as store:
        written = await store.write(PutOp("far", b"v", expire_at_ms=year_9999))
        assert isinstance(written, PutResult)
        assert await store.get("far", wall_clock_ms()) == (1, written.entry)
        assert await store.next_expiry() == year_9999
        await store.write(ExpireOp(year_9999, 10))
        assert (await store.get("far", wall_clock_ms()))[1] is None
