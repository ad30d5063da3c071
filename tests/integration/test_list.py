"""List through a real gRPC server: consistent pagination under concurrent writes, ranges, options,
default page size and expired page tokens. Every test runs against each store backend."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.config import HistoryRetention

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from kvserver.server import RunningServer

    StartServer = Callable[..., Awaitable[RunningServer]]
    Stub = kv_pb2_grpc.KeyValueAsyncStub

TIMEOUT_S = 20.0
MAX_PAGES = 200


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return kv_pb2_grpc.KeyValueStub(channel)


async def put_all(stub: Stub, items: Sequence[tuple[str, bytes]], concurrency: int = 100) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        for start_index in range(0, len(items), concurrency):
            chunk = items[start_index : start_index + concurrency]
            await asyncio.gather(
                *(stub.Put(kv_pb2.PutRequest(key=key, value_bytes=value)) for key, value in chunk)
            )


def content(entry: kv_pb2.Entry) -> bytes | None:
    """The entry's value as bytes; None when it carries none."""
    which = entry.WhichOneof("content")
    if which == "value":
        return entry.value.encode()
    if which == "value_bytes":
        return entry.value_bytes
    return None


async def list_pages(stub: Stub, **request: object) -> list[kv_pb2.ListResponse]:
    """Every page of one listing, following next_page_token."""
    pages: list[kv_pb2.ListResponse] = []
    token = ""
    async with asyncio.timeout(TIMEOUT_S):
        for _ in range(MAX_PAGES):
            page = await stub.List(kv_pb2.ListRequest(page_token=token, **request))  # type: ignore[arg-type]
            pages.append(page)
            token = page.next_page_token
            if not token:
                return pages
    raise AssertionError(f"the listing did not end within {MAX_PAGES} pages")


async def list_keys(stub: Stub, **request: object) -> list[str]:
    return [entry.key for page in await list_pages(stub, **request) for entry in page.entries]


async def test_pages_show_one_snapshot_while_writes_go_on(stub: Stub) -> None:
    # Even indexes exist at the start; odd ones are created during the listing, between and
    # around the keys already returned. Index % 4 tells which writer owns a key, so the two
    # writers never touch the same key and `current` stays exact.
    original = {f"key/{index:04d}": f"original {index}".encode() for index in range(0, 1000, 2)}
    await put_all(stub, sorted(original.items()))
    snapshot_revision = (await stub.Status(kv_pb2.StatusRequest())).header.revision
    assert snapshot_revision == len(original)
    current = dict(original)
    rng = random.Random(7)
    stop = asyncio.Event()
    background_writes = 0

    async def write(key: str, value: bytes | None) -> None:
        if value is None:
            await stub.Delete(kv_pb2.DeleteRequest(key=key, allow_missing=True))
            current.pop(key, None)
        else:
            await stub.Put(kv_pb2.PutRequest(key=key, value_bytes=value))
            current[key] = value

    def op(index: int, round_: int) -> tuple[str, bytes | None]:
        key = f"key/{index:04d}"
        if index % 2 == 1 or rng.random() < 0.6:
            return key, f"round {round_} {index}".encode()
        return key, None

    async def background_writer() -> None:
        nonlocal background_writes
        for round_ in range(2000):
            if stop.is_set():
                return
            indexes = rng.sample(range(0, 1000, 4), 3) + rng.sample(range(1, 1000, 4), 3)
            await asyncio.gather(*(write(*op(index, round_)) for index in indexes))
            background_writes += len(indexes)

    async def between_pages(round_: int, last_key: str) -> None:
        """Deterministic changes right before the next page: just behind, at and ahead of the
        cursor, and far away in both directions."""
        last = int(last_key.rsplit("/", 1)[1])
        targets = {last - 2, last - 1, last, last + 1, last + 2, last + 3, last + 5, last + 6, 3, 998, 999}
        for index in sorted(i for i in targets if 0 <= i < 1000 and i % 4 in (2, 3)):
            await write(*op(index, round_))

    first = await stub.List(kv_pb2.ListRequest(page_size=37))
    assert first.header.revision == snapshot_revision
    pages = [first]
    writer = asyncio.create_task(background_writer())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            token = first.next_page_token
            for round_ in range(MAX_PAGES):
                if not token:
                    break
                await between_pages(round_, pages[-1].entries[-1].key)
                await asyncio.sleep(0)  # let the background writer in between
                page = await stub.List(kv_pb2.ListRequest(page_size=37, page_token=token))
                pages.append(page)
                token = page.next_page_token
            assert not token
    finally:
        stop.set()
        async with asyncio.timeout(TIMEOUT_S):
            await writer

    assert background_writes > 0
    assert {page.header.revision for page in pages} == {snapshot_revision}
    assert all(0 < len(page.entries) <= 37 for page in pages)
    listed = [(entry.key, content(entry)) for page in pages for entry in page.entries]
    assert listed == sorted(original.items())
    for page in pages:
        for entry in page.entries:
            assert entry.mod_revision <= snapshot_revision
            assert entry.version == 1

    # The writes did happen: a new listing shows them, as one snapshot again.
    assert (await stub.Status(kv_pb2.StatusRequest())).header.revision > snapshot_revision
    after = await list_pages(stub, page_size=37)
    assert len({page.header.revision for page in after}) == 1
    assert [(entry.key, content(entry)) for page in after for entry in page.entries] == sorted(
        current.items()
    )


async def test_keys_only_leaves_values_out(stub: Stub) -> None:
    await put_all(stub, [("k/text", b"hello"), ("k/binary", b"\xff\x00"), ("k/empty", b"")])
    await stub.Put(kv_pb2.PutRequest(key="k/text", value="hello again"))

    full = await stub.List(kv_pb2.ListRequest(prefix="k/"))
    assert [(entry.key, entry.WhichOneof("content")) for entry in full.entries] == [
        ("k/binary", "value_bytes"),
        ("k/empty", None),
        ("k/text", "value"),
    ]
    assert full.entries[0].value_bytes == b"\xff\x00"
    assert full.entries[2].value == "hello again"

    keys_only = await stub.List(kv_pb2.ListRequest(prefix="k/", keys_only=True))
    assert [entry.key for entry in keys_only.entries] == ["k/binary", "k/empty", "k/text"]
    assert all(entry.WhichOneof("content") is None for entry in keys_only.entries)
    for with_value, without in zip(full.entries, keys_only.entries, strict=True):
        assert (without.create_revision, without.mod_revision, without.version) == (
            with_value.create_revision,
            with_value.mod_revision,
            with_value.version,
        )
    assert keys_only.entries[2].version == 2

    # keys_only holds on every page of a listing.
    pages = await list_pages(stub, prefix="k/", keys_only=True, page_size=1)
    assert len(pages) == 3
    assert all(entry.WhichOneof("content") is None for page in pages for entry in page.entries)


async def test_include_count_counts_the_whole_range_at_the_snapshot(stub: Stub) -> None:
    await put_all(
        stub, [(f"c/{index:02d}", b"v") for index in range(50)] + [(f"d/{index}", b"v") for index in range(7)]
    )

    without = await stub.List(kv_pb2.ListRequest(prefix="c/", page_size=10))
    assert without.count == 0

    first = await stub.List(kv_pb2.ListRequest(prefix="c/", page_size=20, include_count=True))
    assert first.count == 50
    assert len(first.entries) == 20
    # Changes after the snapshot do not change the count of its later pages.
    await stub.Delete(kv_pb2.DeleteRequest(key="c/", prefix=True))
    await put_all(stub, [(f"c/new{index}", b"v") for index in range(3)])
    token = first.next_page_token
    counts = [first.count]
    async with asyncio.timeout(TIMEOUT_S):
        for _ in range(10):
            if not token:
                break
            page = await stub.List(
                kv_pb2.ListRequest(prefix="c/", page_size=20, include_count=True, page_token=token)
            )
            counts.append(page.count)
            token = page.next_page_token
    assert counts == [50, 50, 50]

    now = await stub.List(kv_pb2.ListRequest(prefix="c/", include_count=True, page_size=1))
    assert now.count == 3
    assert (await stub.List(kv_pb2.ListRequest(include_count=True, page_size=1))).count == 10
    assert (
        await stub.List(kv_pb2.ListRequest(start_key="c/new1", end_key="d/3", include_count=True))
    ).count == 5
    assert (await stub.List(kv_pb2.ListRequest(prefix="none/", include_count=True))).count == 0


RANGE_KEYS = ["a", "a/1", "a/2", "a0", "ab", "b", "z", "é", "é/x", "€", "🔑", "🔑/1"]


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ({}, RANGE_KEYS),
        ({"prefix": "a/"}, ["a/1", "a/2"]),
        ({"prefix": "a"}, ["a", "a/1", "a/2", "a0", "ab"]),
        ({"prefix": "é"}, ["é", "é/x"]),
        ({"prefix": "🔑"}, ["🔑", "🔑/1"]),
        ({"prefix": "nothing"}, []),
        ({"start_key": "a/", "end_key": "b"}, ["a/1", "a/2", "a0", "ab"]),
        ({"start_key": "a/2", "end_key": "a0"}, ["a/2"]),
        ({"start_key": "b"}, ["b", "z", "é", "é/x", "€", "🔑", "🔑/1"]),
        ({"end_key": "a0"}, ["a", "a/1", "a/2"]),
        ({"start_key": "é/x", "end_key": "🔑"}, ["é/x", "€"]),
        ({"start_key": "zz", "end_key": "é"}, []),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else "",
)
async def test_prefix_and_ranges_in_utf8_byte_order(
    stub: Stub, request_fields: dict[str, str], expected: list[str]
) -> None:
    await put_all(stub, [(key, key.encode()) for key in reversed(RANGE_KEYS)])
    assert sorted(RANGE_KEYS, key=str.encode) == RANGE_KEYS
    assert await list_keys(stub, **request_fields) == expected
    # The same range one key per page: the pages together are the same keys.
    assert await list_keys(stub, page_size=1, **request_fields) == expected
    assert await list_keys(stub, page_size=2, keys_only=True, **request_fields) == expected
    count = await stub.List(kv_pb2.ListRequest(include_count=True, page_size=1, **request_fields))  # type: ignore[arg-type]
    assert count.count == len(expected)


async def test_default_and_maximum_page_size(stub: Stub) -> None:
    limits = (await stub.Status(kv_pb2.StatusRequest())).limits
    assert (limits.default_page_size, limits.max_page_size) == (100, 1000)
    keys = [f"p/{index:04d}" for index in range(1050)]
    await put_all(stub, [(key, b"v") for key in keys])

    pages = await list_pages(stub)
    assert [len(page.entries) for page in pages] == [100] * 10 + [50]
    assert [entry.key for page in pages for entry in page.entries] == keys
    assert pages[-1].next_page_token == ""

    largest = await list_pages(stub, page_size=1000, keys_only=True)
    assert [len(page.entries) for page in largest] == [1000, 50]
    # Page sizes may change between pages of one listing.
    mixed_first = await stub.List(kv_pb2.ListRequest(page_size=3))
    mixed_second = await stub.List(kv_pb2.ListRequest(page_token=mixed_first.next_page_token))
    assert len(mixed_second.entries) == 100
    assert mixed_second.entries[0].key == keys[3]


async def test_a_last_page_that_is_exactly_full_has_no_token(stub: Stub) -> None:
    await put_all(stub, [(f"e/{index}", b"v") for index in range(6)])
    pages = await list_pages(stub, page_size=3)
    assert [len(page.entries) for page in pages] == [3, 3]
    empty = await stub.List(kv_pb2.ListRequest(prefix="nothing/"))
    assert (list(empty.entries), empty.next_page_token) == ([], "")


async def test_a_token_expires_with_its_history(start_server: StartServer) -> None:
    # Only the 5 newest events of history are kept.
    server = await start_server(history=HistoryRetention(max_events=5))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        await put_all(stub, [(f"t/{index:02d}", b"v") for index in range(20)], concurrency=1)
        first = await stub.List(kv_pb2.ListRequest(page_size=5))
        assert first.header.revision == 20
        await put_all(stub, [(f"u/{index}", b"v") for index in range(5)], concurrency=1)

        # History up to the snapshot revision discarded: Watch can start at 21 at the earliest,
        # and the listing at 20 can still go on (a snapshot needs only the events after it).
        assert await server.maintenance.compact_once() == 20
        assert (await stub.Status(kv_pb2.StatusRequest())).compact_revision == 21
        second = await stub.List(kv_pb2.ListRequest(page_size=5, page_token=first.next_page_token))
        assert second.header.revision == 20
        assert [entry.key for entry in second.entries] == [f"t/{index:02d}" for index in range(5, 10)]

        # One more write and the history of revision 20 is gone.
        await stub.Put(kv_pb2.PutRequest(key="u/5", value="v"))
        assert await server.maintenance.compact_once() == 21
        revision = (await stub.Status(kv_pb2.StatusRequest())).header.revision
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.List(kv_pb2.ListRequest(page_size=5, page_token=second.next_page_token))
        assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE, raised.value.details()
        assert "20" in (raised.value.details() or "")
        assert (await stub.Status(kv_pb2.StatusRequest())).header.revision == revision

        # A new listing starts from the current revision and works.
        fresh = await list_pages(stub, page_size=5)
        assert {page.header.revision for page in fresh} == {revision}
        assert len([entry for page in fresh for entry in page.entries]) == 26


async def test_a_page_fits_the_clients_default_message_limit(stub: Stub) -> None:
    """1000 keys of 4 KiB (2-byte characters) with 1 KiB values are about 5 MiB: the server
    cuts the page short rather than send more than a client accepts (4 MiB by default)."""
    prefix = "é" * 2040
    keys = [f"{prefix}{index:04d}" for index in range(1000)]
    assert all(len(key.encode()) <= 4096 for key in keys)
    await put_all(stub, [(key, b"v" * 1024) for key in keys])
    pages = await list_pages(stub, page_size=1000)
    assert len(pages) > 1
    assert [entry.key for page in pages for entry in page.entries] == keys
    assert all(page.ByteSize() <= 4 * 1024 * 1024 for page in pages)
