"""The watch hub's live fan-out against a stand-in store: shared feeds, turns, coalescing, limits, and
the wire bytes a live message is assembled from (byte for byte protobuf's own serialisation)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, cast

import pytest

from kv.v1 import kv_pb2
from kvserver.api.convert import watch_message_to_bytes, watch_message_to_proto
from kvserver.config import Limits, WatchSettings
from kvserver.domain import Entry, Event, EventType
from kvserver.service import watch as watch_module
from kvserver.service.watch import CancelReason, WatchCancel, WatchHub, WatchMessage, WatchSpec
from kvserver.store.base import EventListener, Store

TIMEOUT_S = 5.0


class FakeStore:
    """Just what the hub's live path reads: the revision, and listeners called on each commit."""

    def __init__(self) -> None:
        self.revision = 0
        self.compact_revision = 0
        self._listeners: list[EventListener] = []

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def commit(self, *changes: tuple[str, bytes | None]) -> list[Event]:
        """One batch: (key, value) puts and (key, None) deletes, each at its own revision."""
        events = []
        for key, value in changes:
            self.revision += 1
            if value is None:
                events.append(Event(EventType.DELETE, self.revision, key, None, None))
            else:
                entry = Entry(key, value, self.revision, self.revision, 1)
                events.append(Event(EventType.PUT, self.revision, key, entry, None))
        for listener in self._listeners:
            listener(events)
        return events


def make_hub(
    store: FakeStore, settings: WatchSettings | None = None, limits: Limits | None = None
) -> WatchHub:
    return WatchHub(cast(Store, store), settings or WatchSettings(), limits or Limits())


class Stream:
    """One watch read from the hub as a client would: each message's events and header."""

    def __init__(self, hub: WatchHub, spec: WatchSpec) -> None:
        self.messages: AsyncIterator[WatchMessage] = hub.watch(spec)
        self.pending: asyncio.Task[WatchMessage] | None = None

    async def start(self) -> None:
        """Begin reading, so that the watch is registered before the next commit."""
        self.pending = asyncio.ensure_future(anext(self.messages))
        for _ in range(3):
            await asyncio.sleep(0)

    async def next(self) -> WatchMessage:
        task = self.pending or asyncio.ensure_future(anext(self.messages))
        self.pending = None
        async with asyncio.timeout(TIMEOUT_S):
            return await task

    async def read_until(self, revision: int) -> list[WatchMessage]:
        received: list[WatchMessage] = []
        while not received or received[-1].revision < revision:
            received.append(await self.next())
        return received

    async def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await self.pending
        await cast(Any, self.messages).aclose()


def revisions(messages: Sequence[WatchMessage]) -> list[int]:
    return [event.revision for message in messages for event in message.events]


async def test_streams_get_their_key_range_in_order_exactly_once() -> None:
    store = FakeStore()
    hub = make_hub(store)
    prefix = [Stream(hub, WatchSpec("a/", prefix=True)) for _ in range(20)]
    single = Stream(hub, WatchSpec("a/1"))
    other = Stream(hub, WatchSpec("b/", prefix=True))
    for stream in [*prefix, single, other]:
        await stream.start()
    wanted: list[int] = []
    wanted_single: list[int] = []
    for batch in range(30):
        events = store.commit(("a/1", b"x"), ("a/2", b"y"), ("c", b"z"))
        wanted += [events[0].revision, events[1].revision]
        wanted_single.append(events[0].revision)
        if batch % 7 == 0:
            await asyncio.sleep(0)  # let some sends happen between commits
    last = store.revision
    for stream in prefix:
        received = await stream.read_until(last)
        assert revisions(received) == wanted
        # A header promises delivery up to its revision; the last one is the store's.
        assert received[-1].revision == last
    assert revisions(await single.read_until(last)) == wanted_single
    assert len(hub._feeds) == 3  # one feed per key range, not per stream
    for stream in [*prefix, single, other]:
        await stream.close()
    assert hub.active == 0
    assert not hub._feeds


async def test_a_busy_stream_coalesces_and_an_idle_one_sends_at_once() -> None:
    store = FakeStore()
    hub = make_hub(store)
    stream = Stream(hub, WatchSpec("k/", prefix=True))
    await stream.start()
    store.commit(("k/1", b"1"))
    first = await stream.next()
    assert revisions([first]) == [1]
    # While the stream is not reading, commits pile up: they go out together.
    for index in range(50):
        store.commit((f"k/{index}", b"v"))
    received = await stream.read_until(store.revision)
    assert revisions(received) == list(range(2, 52))
    assert len(received) < 5
    await stream.close()


async def test_messages_stay_within_the_count_and_size_budget() -> None:
    store = FakeStore()
    limits = replace(Limits(), max_response_bytes=2000)
    hub = make_hub(store, limits=limits)
    stream = Stream(hub, WatchSpec("k/", prefix=True))
    await stream.start()
    for _ in range(40):
        store.commit(("k/1", b"v" * 300))
    received = await stream.read_until(store.revision)
    assert revisions(received) == list(range(1, 41))
    for message in received:
        size = sum(watch_module._event_size(event) for event in message.events)
        assert size <= 2000 or len(message.events) == 1
        # Each message's header: its last event, or the store's revision once nothing is left.
        assert message.revision >= message.events[-1].revision
    await stream.close()


async def test_a_slow_consumer_is_cancelled_and_its_feed_stays_bounded() -> None:
    store = FakeStore()
    hub = make_hub(store, WatchSettings(buffer_events=10))
    slow = Stream(hub, WatchSpec("k/", prefix=True))
    fast = Stream(hub, WatchSpec("k/", prefix=True))
    await slow.start()
    await fast.start()
    store.commit(("k/1", b"1"))
    assert revisions([await slow.next()]) == [1]
    for index in range(2, 600):
        store.commit((f"k/{index}", b"v"))
        if index % 5 == 0:
            await fast.read_until(store.revision)
    feed = next(iter(hub._feeds.values()))
    assert len(feed.events) <= 10 + watch_module._TRIM_EVERY
    message = await slow.next()
    assert message.cancel is not None
    assert message.cancel.reason is CancelReason.SLOW_CONSUMER
    assert message.cancel.resume_revision == 2
    await slow.close()
    await fast.close()


async def test_the_feed_forgets_what_every_stream_has_sent() -> None:
    store = FakeStore()
    hub = make_hub(store)
    streams = [Stream(hub, WatchSpec("k/", prefix=True)) for _ in range(3)]
    for stream in streams:
        await stream.start()
    for index in range(3 * watch_module._TRIM_EVERY):
        store.commit((f"k/{index % 10}", b"v"))
        for stream in streams:
            await stream.read_until(store.revision)
    feed = next(iter(hub._feeds.values()))
    assert len(feed.events) <= watch_module._TRIM_EVERY
    assert all(len(encoding.offsets) <= watch_module._TRIM_EVERY + 1 for encoding in feed.encodings.values())
    for stream in streams:
        await stream.close()


async def test_progress_and_shutdown() -> None:
    store = FakeStore()
    hub = make_hub(store)
    quiet = Stream(hub, WatchSpec("q", progress_interval_ms=100))
    busy = Stream(hub, WatchSpec("k/", prefix=True, progress_interval_ms=100))
    await quiet.start()
    await busy.start()
    store.commit(("elsewhere", b"1"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    progress = await quiet.next()
    assert progress.events == ()
    assert progress.cancel is None
    assert progress.revision == store.revision
    assert loop.time() - started >= 0.05
    store.commit(("k/1", b"1"))
    assert revisions(await busy.read_until(2)) == [2]  # after progress messages of its own
    hub.close()
    # Each resumes after the last revision it promised (its last header before the cancel).
    for stream, promised in ((quiet, progress.revision), (busy, 2)):
        message = await stream.next()
        while message.cancel is None:  # a progress message sent just before
            promised = message.revision
            message = await stream.next()
        assert message.cancel.reason is CancelReason.SHUTDOWN
        assert message.cancel.resume_revision == promised + 1
        with pytest.raises(StopAsyncIteration):
            await stream.next()
    assert hub.active == 0


# --------------------------------------------------------------------------- the wire bytes


def _entry(key: str, value: bytes, revision: int, **extra: Any) -> Entry:
    return Entry(key, value, revision - 1, revision, 3, **extra)


def _events() -> list[Event]:
    previous = _entry("k/a", b"old", 3, content_type="text/plain")
    return [
        Event(EventType.PUT, 4, "k/a", _entry("k/a", b"new", 4, content_type="text/plain"), previous),
        Event(EventType.PUT, 5, "k/b", _entry("k/b", b"\xff\x00binary", 5, expire_at_ms=2**40), None),
        Event(EventType.PUT, 6, "k/\u00e9t\u00e9", _entry("k/\u00e9t\u00e9", b"", 6), None),
        Event(EventType.DELETE, 7, "k/a", None, _entry("k/a", b"new", 4)),
        Event(EventType.EXPIRE, 8, "k/b", None, _entry("k/b", b"x" * 300, 5, expire_at_ms=5)),
        Event(EventType.PUT, 9, "k/big", _entry("k/big", b"y" * 70_000, 9), _entry("k/big", b"z", 2)),
    ]


def _check(message: WatchMessage) -> None:
    for with_previous in (False, True):
        expected = watch_message_to_proto(message, with_previous=with_previous).SerializeToString()
        assert watch_message_to_bytes(message, with_previous=with_previous) == expected
        kv_pb2.WatchResponse.FromString(expected)


@pytest.mark.parametrize("revision", [0, 1, 127, 128, 300, 2**40])
def test_progress_bytes(revision: int) -> None:
    _check(WatchMessage(revision))


def test_initial_state_and_cancel_bytes() -> None:
    entries = [event.entry for event in _events() if event.entry is not None]
    _check(WatchMessage(9, initial_entries=entries))
    _check(WatchMessage(9, initial_entries=entries[:1], initial_state_complete=True))
    _check(WatchMessage(9, initial_state_complete=True))
    for reason in CancelReason:
        _check(WatchMessage(9, cancel=WatchCancel(reason, 3, 8, "why \u00e9")))
    _check(WatchMessage(9, cancel=WatchCancel(CancelReason.COMPACTED, 0, 0, "")))


def test_replayed_event_bytes() -> None:
    _check(WatchMessage(9, events=_events()))


async def test_live_event_bytes_from_the_shared_encoding() -> None:
    store = FakeStore()
    hub = make_hub(store)
    streams = [Stream(hub, WatchSpec("k/", prefix=True)) for _ in range(3)]
    for stream in streams:
        await stream.start()
    events = _events()
    listener = store._listeners[0]
    store.revision = 3
    for index, event in enumerate(events):
        store.revision = event.revision
        listener([event])
        if index == 2:
            # One stream sends its part now, the others later with more in the same message.
            assert (await streams[0].read_until(event.revision))[0].shared is not None
    store.revision = 20  # a header past the last event: nothing else pending
    checked = 0
    for stream in streams:
        for message in await stream.read_until(20):
            assert message.shared is not None
            _check(message)
            # Cached bytes for one run must not leak into a message of another header.
            _check(replace(message, revision=message.revision + 1))
            checked += 1
        await stream.close()
    assert checked >= 4
