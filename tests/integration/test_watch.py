"""Watch through a real gRPC server: events and previous entries, resuming from any retained
revision, initial state, progress, compaction, slow consumers and shutdown. Every test runs
against each store backend."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.config import HistoryRetention, WatchSettings

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from kvserver.server import RunningServer

    StartServer = Callable[..., Awaitable[RunningServer]]
    Stub = kv_pb2_grpc.KeyValueAsyncStub
    WatchCall = grpc.aio.UnaryStreamCall[kv_pb2.WatchRequest, kv_pb2.WatchResponse]

TIMEOUT_S = 10.0
MAX_MESSAGES = 10_000

PUT = kv_pb2.Event.TYPE_PUT
DELETE = kv_pb2.Event.TYPE_DELETE
EXPIRE = kv_pb2.Event.TYPE_EXPIRE


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return kv_pb2_grpc.KeyValueStub(channel)


async def current_revision(stub: Stub) -> int:
    async with asyncio.timeout(TIMEOUT_S):
        return (await stub.Status(kv_pb2.StatusRequest())).header.revision


async def next_message(call: WatchCall, timeout_s: float = TIMEOUT_S) -> kv_pb2.WatchResponse:
    async with asyncio.timeout(timeout_s):
        message = await call.read()
    assert isinstance(message, kv_pb2.WatchResponse), "the stream ended"
    return message


def check_one_kind(message: kv_pb2.WatchResponse) -> None:
    """Exactly one of: initial entries, events, cancel, or a progress message (header only)."""
    kinds = [
        bool(message.initial_entries) or message.initial_state_complete,
        bool(message.events),
        message.HasField("cancel"),
    ]
    assert sum(kinds) <= 1, message
    assert message.HasField("header")


@dataclass
class Received:
    events: list[kv_pb2.Event]
    messages: list[kv_pb2.WatchResponse]

    @property
    def revisions(self) -> list[int]:
        return [event.entry.mod_revision for event in self.events]


async def read_until(call: WatchCall, revision: int, timeout_s: float = TIMEOUT_S) -> Received:
    """Read messages until the stream reports `revision` delivered (by an event or a header)."""
    received = Received([], [])
    async with asyncio.timeout(timeout_s):
        for _ in range(MAX_MESSAGES):
            message = await next_message(call, timeout_s)
            check_one_kind(message)
            assert not message.HasField("cancel"), message.cancel
            received.messages.append(message)
            received.events.extend(message.events)
            if message.header.revision >= revision:
                return received
    raise AssertionError(f"revision {revision} not reached in {MAX_MESSAGES} messages")


async def read_to_cancel(
    call: WatchCall, timeout_s: float = TIMEOUT_S
) -> tuple[Received, kv_pb2.WatchCancel]:
    """Read every message up to the one with `cancel`, which must be the last."""
    received = Received([], [])
    async with asyncio.timeout(timeout_s):
        for _ in range(MAX_MESSAGES):
            message = await next_message(call, timeout_s)
            check_one_kind(message)
            received.messages.append(message)
            received.events.extend(message.events)
            if message.HasField("cancel"):
                return received, message.cancel
    raise AssertionError(f"no cancel in {MAX_MESSAGES} messages")


async def expect_end(call: WatchCall, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(TIMEOUT_S):
            await call.read()
    assert raised.value.code() == code, raised.value.details()
    async with asyncio.timeout(TIMEOUT_S):
        assert await call.code() == code


def assert_increasing(revisions: list[int]) -> None:
    assert all(a < b for a, b in itertools.pairwise(revisions)), revisions


@dataclass(frozen=True)
class Change:
    """One change made by a test, as the watch must report it."""

    revision: int
    type: int
    key: str
    value: str = ""


def as_changes(events: list[kv_pb2.Event]) -> list[Change]:
    return [
        Change(event.entry.mod_revision, event.type, event.entry.key, event.entry.value) for event in events
    ]


class Writer:
    """Makes writes and logs every change with its revision."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.log: list[Change] = []

    async def put(self, key: str, value: str, **options: object) -> kv_pb2.PutResponse:
        response = await self.stub.Put(kv_pb2.PutRequest(key=key, value=value, **options))  # type: ignore[arg-type]
        self.log.append(Change(response.header.revision, PUT, key, value))
        return response

    async def delete(self, key: str) -> kv_pb2.DeleteResponse:
        response = await self.stub.Delete(kv_pb2.DeleteRequest(key=key))
        self.log.append(Change(response.header.revision, DELETE, key))
        return response

    def matching(self, accept: Callable[[str], bool], start: int, end: int | None = None) -> list[Change]:
        return [
            change
            for change in self.log
            if accept(change.key) and change.revision >= start and (end is None or change.revision <= end)
        ]


async def test_watch_one_key_with_previous_entries(stub: Stub) -> None:
    start = await current_revision(stub) + 1
    call = stub.Watch(kv_pb2.WatchRequest(key="k", start_revision=start, include_previous=True))
    try:
        first = await stub.Put(kv_pb2.PutRequest(key="k", value="v1"))
        await stub.Put(kv_pb2.PutRequest(key="k/child", value="not watched"))
        await stub.Put(kv_pb2.PutRequest(key="other", value="not watched"))
        second = await stub.Put(kv_pb2.PutRequest(key="k", value_bytes=b"\xff\x00"))
        deleted = await stub.Delete(kv_pb2.DeleteRequest(key="k"))
        third = await stub.Put(kv_pb2.PutRequest(key="k", value="short-lived", ttl_ms=300))

        received = await read_until(call, third.header.revision)
        # The TTL passes and the server removes the key with an EXPIRE event of its own.
        expired = await read_until(call, third.header.revision + 1, timeout_s=5.0)
    finally:
        call.cancel()

    events = received.events + expired.events
    assert [(event.type, event.entry.mod_revision) for event in events] == [
        (PUT, first.header.revision),
        (PUT, second.header.revision),
        (DELETE, deleted.header.revision),
        (PUT, third.header.revision),
        (EXPIRE, third.header.revision + 1),
    ]
    put1, put2, delete, put3, expire = events
    assert (put1.entry.key, put1.entry.value, put1.entry.version) == ("k", "v1", 1)
    assert put1.entry.create_revision == first.header.revision
    assert not put1.HasField("prev_entry")
    assert (put2.entry.value_bytes, put2.entry.version) == (b"\xff\x00", 2)
    assert put2.entry.create_revision == first.header.revision
    assert (put2.prev_entry.value, put2.prev_entry.mod_revision, put2.prev_entry.version) == (
        "v1",
        first.header.revision,
        1,
    )
    # A removal carries only the key and its revision; the previous entry has the value.
    assert delete.entry == kv_pb2.Entry(key="k", mod_revision=deleted.header.revision)
    assert (delete.prev_entry.value_bytes, delete.prev_entry.version) == (b"\xff\x00", 2)
    assert (put3.entry.version, put3.entry.create_revision) == (1, third.header.revision)
    assert put3.entry.HasField("expire_time")
    assert not put3.HasField("prev_entry")
    assert expire.entry == kv_pb2.Entry(key="k", mod_revision=third.header.revision + 1)
    assert expire.prev_entry.value == "short-lived"
    assert expire.prev_entry.expire_time == put3.entry.expire_time


async def test_without_include_previous_there_is_no_prev_entry(stub: Stub) -> None:
    start = await current_revision(stub) + 1
    call = stub.Watch(kv_pb2.WatchRequest(key="k", start_revision=start))
    try:
        await stub.Put(kv_pb2.PutRequest(key="k", value="v1"))
        await stub.Put(kv_pb2.PutRequest(key="k", value="v2"))
        last = await stub.Delete(kv_pb2.DeleteRequest(key="k"))
        received = await read_until(call, last.header.revision)
    finally:
        call.cancel()
    assert [event.type for event in received.events] == [PUT, PUT, DELETE]
    assert not any(event.HasField("prev_entry") for event in received.events)


async def test_watch_a_prefix(stub: Stub) -> None:
    writer = Writer(stub)
    start = await current_revision(stub) + 1
    prefix_call = stub.Watch(kv_pb2.WatchRequest(key="app/", prefix=True, start_revision=start))
    everything_call = stub.Watch(kv_pb2.WatchRequest(key="", prefix=True, start_revision=start))
    try:
        for key in ("app/a", "apple", "app", "app/b", "app/a/deep", "ap", "b"):
            await writer.put(key, f"value of {key}")
        await writer.put("app/a", "again")
        deleted = await stub.Delete(kv_pb2.DeleteRequest(key="app/", prefix=True, return_previous=True))
        # A prefix deletion is one revision per key, in key order.
        assert [entry.key for entry in deleted.prev_entries] == ["app/a", "app/a/deep", "app/b"]
        first_deleted = deleted.header.revision - 2
        for offset, entry in enumerate(deleted.prev_entries):
            writer.log.append(Change(first_deleted + offset, DELETE, entry.key))
        last = await writer.put("zzz", "end")
        prefix_events = await read_until(prefix_call, deleted.header.revision)
        all_events = await read_until(everything_call, last.header.revision)
    finally:
        prefix_call.cancel()
        everything_call.cancel()

    assert as_changes(prefix_events.events) == writer.matching(lambda key: key.startswith("app/"), start)
    assert as_changes(all_events.events) == writer.matching(lambda _: True, start)


async def test_resume_from_every_retained_revision_then_live_events(stub: Stub) -> None:
    """For every revision r: replay delivers each event >= r once, in order, and live events
    follow without a gap or a duplicate while writes go on during the replay."""
    writer = Writer(stub)
    in_prefix: Callable[[str], bool] = lambda key: key.startswith("r/")  # noqa: E731
    for index in range(30):
        key = f"r/{index % 7}" if index % 5 else f"s/{index}"
        if index % 6 == 5:
            await writer.put(key, "doomed")
            await writer.delete(key)
        else:
            await writer.put(key, f"v{index}")
    history_end = await current_revision(stub)

    for start in range(1, history_end + 2):
        call = stub.Watch(kv_pb2.WatchRequest(key="r/", prefix=True, start_revision=start))
        try:
            # Writes race with the server's replay: some land before it registers the stream,
            # some during the replay, some after it went live.
            for round_ in range(3):
                await writer.put(f"r/live{round_}", f"from {start}")
                await writer.put(f"s/live{round_}", "not watched")
                await asyncio.sleep(0)
            last = await writer.put("r/last", f"from {start}")
            received = await read_until(call, last.header.revision)
        finally:
            call.cancel()
        expected = writer.matching(in_prefix, start, last.header.revision)
        assert as_changes(received.events) == expected, f"start_revision={start}"
        assert_increasing(received.revisions)
        # Each header promises that every event up to it has arrived.
        seen: list[int] = []
        for message in received.messages:
            seen += [event.entry.mod_revision for event in message.events]
            promised = [change.revision for change in expected if change.revision <= message.header.revision]
            assert seen[: len(promised)] == promised, f"start_revision={start}"


async def test_start_revision_zero_means_after_the_current_revision(stub: Stub) -> None:
    await stub.Put(kv_pb2.PutRequest(key="z", value="before"))
    call = stub.Watch(kv_pb2.WatchRequest(key="z", progress_interval_ms=100))
    try:
        registered = await next_message(call)  # a progress message: the stream is live
        assert not registered.events
        assert registered.header.revision == await current_revision(stub)
        after = await stub.Put(kv_pb2.PutRequest(key="z", value="after"))
        received = await read_until(call, after.header.revision)
    finally:
        call.cancel()
    assert [(event.entry.value, event.entry.mod_revision) for event in received.events] == [
        ("after", after.header.revision)
    ]


async def test_initial_state_then_the_events_after_it(stub: Stub) -> None:
    """1500 entries (two messages of them) while writes go on: the state as of the header
    revision, then exactly the events after that revision."""
    keys = [f"s/{index:04d}" for index in range(1500)]
    async with asyncio.timeout(TIMEOUT_S):
        for start in range(0, len(keys), 100):
            await asyncio.gather(
                *(stub.Put(kv_pb2.PutRequest(key=key, value="v0")) for key in keys[start : start + 100])
            )
        await stub.Put(kv_pb2.PutRequest(key="t/outside", value="x"))
    state = {key: "v0" for key in keys}
    writer = Writer(stub)
    before = await current_revision(stub)

    call = stub.Watch(kv_pb2.WatchRequest(key="s/", prefix=True, include_initial_state=True))

    async def keep_writing() -> None:
        for index in range(60):
            if index % 3 == 2:
                await writer.delete(keys[index * 7])
            else:
                await writer.put(keys[index * 7] if index % 2 else f"s/new{index}", f"v{index}")

    try:
        writes = asyncio.create_task(keep_writing())
        initial: list[kv_pb2.Entry] = []
        initial_revisions = set()
        async with asyncio.timeout(TIMEOUT_S):
            for _ in range(100):
                message = await next_message(call)
                check_one_kind(message)
                assert not message.events, "an event before the initial state was complete"
                initial += message.initial_entries
                initial_revisions.add(message.header.revision)
                if message.initial_state_complete:
                    break
            await writes
        last = await writer.put("s/zz-last", "end")
        received = await read_until(call, last.header.revision)
    finally:
        call.cancel()

    assert len(initial_revisions) == 1
    (snapshot,) = initial_revisions
    assert snapshot >= before
    for change in writer.log:
        if change.revision <= snapshot:
            if change.type == DELETE:
                del state[change.key]
            else:
                state[change.key] = change.value
    assert [(entry.key, entry.value) for entry in initial] == sorted(state.items())
    assert all(entry.mod_revision <= snapshot for entry in initial)
    assert as_changes(received.events) == writer.matching(lambda key: key.startswith("s/"), snapshot + 1)


async def test_initial_state_of_one_key_and_of_an_absent_key(stub: Stub) -> None:
    await stub.Put(kv_pb2.PutRequest(key="one", value="1"))
    await stub.Put(kv_pb2.PutRequest(key="one/other", value="2"))
    present = stub.Watch(kv_pb2.WatchRequest(key="one", include_initial_state=True))
    absent = stub.Watch(kv_pb2.WatchRequest(key="none", include_initial_state=True))
    try:
        message = await next_message(present)
        assert [(entry.key, entry.value) for entry in message.initial_entries] == [("one", "1")]
        assert message.initial_state_complete
        message = await next_message(absent)
        assert list(message.initial_entries) == []
        assert message.initial_state_complete
        assert message.header.revision == await current_revision(stub)
    finally:
        present.cancel()
        absent.cancel()


async def test_messages_fit_the_clients_default_message_limit(stub: Stub) -> None:
    """About 8 MiB of events with their previous entries, replayed, live and as initial state:
    the server cuts them into messages a client accepts (4 MiB by default)."""
    value = "x" * 10 * 1024
    keys = [f"big/{index:03d}" for index in range(200)]
    start = await current_revision(stub) + 1
    live = stub.Watch(
        kv_pb2.WatchRequest(key="big/", prefix=True, start_revision=start, include_previous=True)
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            for _ in range(2):  # the second round replaces every key: each event has a prev_entry
                await asyncio.gather(*(stub.Put(kv_pb2.PutRequest(key=key, value=value)) for key in keys))
        last = await current_revision(stub)
        live_events = await read_until(live, last)
    finally:
        live.cancel()
    replay = stub.Watch(
        kv_pb2.WatchRequest(key="big/", prefix=True, start_revision=start, include_previous=True)
    )
    initial = stub.Watch(kv_pb2.WatchRequest(key="big/", prefix=True, include_initial_state=True))
    try:
        replayed = await read_until(replay, last)
        entries: list[kv_pb2.Entry] = []
        initial_messages = []
        async with asyncio.timeout(TIMEOUT_S):
            for _ in range(100):
                message = await next_message(initial)
                initial_messages.append(message)
                entries += message.initial_entries
                if message.initial_state_complete:
                    break
    finally:
        replay.cancel()
        initial.cancel()

    for received in (live_events, replayed):
        assert received.revisions == list(range(start, last + 1))
        assert sum(event.HasField("prev_entry") for event in received.events) == len(keys)
        assert all(message.ByteSize() <= 4 * 1024 * 1024 for message in received.messages)
    assert len(replayed.messages) > 1
    assert [entry.key for entry in entries] == keys
    assert all(message.ByteSize() <= 4 * 1024 * 1024 for message in initial_messages)


async def test_progress_messages_carry_the_current_revision(stub: Stub) -> None:
    await stub.Put(kv_pb2.PutRequest(key="elsewhere", value="1"))
    call = stub.Watch(kv_pb2.WatchRequest(key="quiet", progress_interval_ms=200))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(2):
            message = await next_message(call, timeout_s=2.0)
            check_one_kind(message)
            assert not message.events
            assert message.header.revision == await current_revision(stub)
        # Two intervals of about 200 ms: neither far too fast nor far too slow.
        assert 0.25 <= loop.time() - started <= 3.0
        # A write elsewhere moves the revision that the next progress message carries.
        moved = await stub.Put(kv_pb2.PutRequest(key="elsewhere", value="2"))
        async with asyncio.timeout(3.0):
            for _ in range(20):
                message = await next_message(call, timeout_s=2.0)
                assert not message.events
                if message.header.revision == moved.header.revision:
                    break
            else:
                raise AssertionError("no progress message with the new revision")
    finally:
        call.cancel()


async def test_a_compacted_start_revision_is_cancelled_with_out_of_range(start_server: StartServer) -> None:
    server = await start_server(history=HistoryRetention(max_events=5))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        for index in range(20):
            await stub.Put(kv_pb2.PutRequest(key=f"c/{index % 3}", value=f"v{index}"))
        compacted = await server.maintenance.compact_once()
        assert compacted == 15
        # Status reports the oldest revision a watch can still start from.
        assert (await stub.Status(kv_pb2.StatusRequest())).compact_revision == compacted + 1

        for start in (1, 3, compacted):
            call = stub.Watch(kv_pb2.WatchRequest(key="c/", prefix=True, start_revision=start))
            received, cancel = await read_to_cancel(call)
            assert received.events == []
            assert cancel.reason == kv_pb2.WatchCancel.REASON_COMPACTED
            assert cancel.compact_revision > start
            assert cancel.message
            await expect_end(call, grpc.StatusCode.OUT_OF_RANGE)

        # compact_revision is the oldest revision the server can still deliver.
        oldest = cancel.compact_revision
        call = stub.Watch(kv_pb2.WatchRequest(key="c/", prefix=True, start_revision=oldest))
        try:
            received = await read_until(call, 20)
        finally:
            call.cancel()
        assert received.revisions == list(range(oldest, 21))


@pytest.mark.slow
async def test_a_slow_consumer_is_cancelled_and_resumes_without_a_gap(start_server: StartServer) -> None:
    server = await start_server(watch=WatchSettings(buffer_events=50))
    writes = 1200
    value = "x" * 10 * 1024
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        start = await current_revision(stub) + 1
        call = stub.Watch(kv_pb2.WatchRequest(key="slow/", prefix=True, start_revision=start))
        try:
            # The client reads nothing while the writes happen: flow control fills up, the
            # server's buffer for the stream overflows.
            async with asyncio.timeout(30.0):
                for batch in range(0, writes, 50):
                    await asyncio.gather(
                        *(
                            stub.Put(kv_pb2.PutRequest(key=f"slow/{index % 97}", value=value))
                            for index in range(batch, batch + 50)
                        )
                    )
            last = await current_revision(stub)
            assert last == start + writes - 1
            received, cancel = await read_to_cancel(call, timeout_s=20.0)
            await expect_end(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
        finally:
            call.cancel()

        assert cancel.reason == kv_pb2.WatchCancel.REASON_SLOW_CONSUMER
        assert cancel.message
        delivered = received.revisions
        assert_increasing(delivered)
        assert delivered == list(range(start, start + len(delivered)))
        assert len(delivered) < writes
        headers = [message.header.revision for message in received.messages[:-1]]
        assert cancel.resume_revision == (max(headers) + 1 if headers else start)
        assert cancel.resume_revision == (delivered[-1] + 1 if delivered else start)

        resumed = stub.Watch(
            kv_pb2.WatchRequest(key="slow/", prefix=True, start_revision=cancel.resume_revision)
        )
        try:
            rest = await read_until(resumed, last, timeout_s=20.0)
        finally:
            resumed.cancel()
        assert delivered + rest.revisions == list(range(start, last + 1))
        assert all(event.entry.value == value for event in rest.events)


async def test_server_stop_cancels_open_watches_with_shutdown(start_server: StartServer) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        await stub.Put(kv_pb2.PutRequest(key="before", value="1"))
        live = stub.Watch(kv_pb2.WatchRequest(key="w/", prefix=True, progress_interval_ms=100))
        quiet = stub.Watch(kv_pb2.WatchRequest(key="other", progress_interval_ms=100))
        put = await stub.Put(kv_pb2.PutRequest(key="w/1", value="1"))
        received = await read_until(live, put.header.revision)
        assert received.revisions == [put.header.revision]
        await read_until(quiet, put.header.revision)

        stopping = asyncio.create_task(server.stop(grace_s=5.0))
        try:
            for call in (live, quiet):
                before_cancel, cancel = await read_to_cancel(call)
                assert cancel.reason == kv_pb2.WatchCancel.REASON_SHUTDOWN
                assert cancel.message
                # Every message promises delivery up to its header revision: resume after it.
                assert cancel.resume_revision == put.header.revision + 1
                assert all(
                    message.header.revision == put.header.revision for message in before_cancel.messages
                )
                await expect_end(call, grpc.StatusCode.UNAVAILABLE)
        finally:
            async with asyncio.timeout(TIMEOUT_S):
                await stopping
