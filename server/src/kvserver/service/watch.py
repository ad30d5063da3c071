"""Watch streams: replay from history, optional initial state, live events, progress, resync.

The hub hears every committed batch from the store (in revision order, before the writes are
acknowledged). Streams watching the same key range share one feed: the batch is filtered once per
feed, and its matching events are appended to the feed's list, which each stream reads from its
own position. A stream's message then costs the same whatever it carries: the events' sizes are
a running total kept once per feed, and their wire encoding is made once per feed and encoding
function (`SharedEvents.encoded`), so a stream's message is a slice of shared bytes, and the
streams of a round that send the same run with the same header send the very same bytes.

Live messages go out in rounds run by one scheduler for the whole hub, not by a timer per stream. A
stream with events to send joins the queue of the next round. A round starts when the one before it
has ended and a pause after it has passed, and the event loop is idle (a call it was asked to run
ran within 1 ms), or at the latest 0.5 s after the last round ended. A round hands out turns a pass
of the event loop at a time, as many streams per pass as run their turns in about 2 ms (measured on
the previous passes: a loop busy with other calls gets smaller passes), so that the other calls,
the writes among them, wait at most a pass, not a round. On its turn a stream sends everything
pending, within one message's budget, in one message; with more to send it joins the next round.
The pause after a round is a multiple of the round's duration: 0.5 at first, raised (up to 4, and
at most 0.5 s) while the loop's thread was busy more than half of the last pause with other work,
lowered when it was busy less than a quarter of it. So an idle server sends an event at once, and a
busy one coalesces, by as much as the loop needs for the rest of its work: every grpc.aio message
costs the loop about the same whatever it carries (about 50 us here), and a loop kept busy sending
to every stream after every commit starves the writes. A stream with nothing to send costs nothing
until an event of its key range arrives; its progress message comes from a timer of its own, armed
once per interval.

A stream whose unsent events exceed its buffer is ended with an explicit SLOW_CONSUMER message
naming the revision to resume from: never a silent gap. A feed keeps the events from the oldest
position one of its streams still needs, at most a buffer's worth.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kvserver.config import Limits, WatchSettings
from kvserver.domain import (
    Compacted,
    Entry,
    Event,
    InvalidArgument,
    KeyRange,
    ResourceExhausted,
    wall_clock_ms,
)
from kvserver.store.base import Store

_REPLAY_CHUNK = 1000
_MAX_EVENTS_PER_MESSAGE = 1000
_MIN_PROGRESS_INTERVAL_MS = 100
# A pass gives turns to as many streams as take about this long to run theirs (measured): what
# other calls wait behind at most.
_PASS_S = 0.002
_MIN_TURNS, _MAX_TURNS = 4, 256
# After a round of turns, the hub pauses this many times as long as the round took (the ratio
# adapts between these bounds) and at most _MAX_PAUSE_S: the event loop's time for everything else.
_MIN_PAUSE_RATIO, _MAX_PAUSE_RATIO = 0.5, 4.0
_MAX_PAUSE_S = 0.5
# A pause during which the loop's thread was busy more than this share of the time was too short.
_BUSY = 0.5
# The loop is idle enough to start a round when a call it was asked to run ran within this.
_IDLE_PASS_S = 0.001
# A feed drops the events no stream needs any more after this many more were added.
_TRIM_EVERY = 256
# How early a timer may fire (uvloop rounds to milliseconds).
_TIMER_SLACK_S = 0.002

T = TypeVar("T")


class CancelReason(enum.Enum):
    COMPACTED = 1
    SLOW_CONSUMER = 2
    SHUTDOWN = 3


@dataclass(frozen=True, slots=True)
class WatchCancel:
    reason: CancelReason
    compact_revision: int
    resume_revision: int
    message: str


class _Encoding:
    """One encoding of a run of a feed's events: their bytes back to back, and where each starts."""

    __slots__ = ("data", "last", "offsets", "origin", "start")

    def __init__(self, start: int) -> None:
        self.start = start  # the feed position of the first event encoded
        self.origin = 0  # the offset of data[0]
        self.offsets = [0]  # the offset of each encoded event, and one past the last
        self.data = bytearray()
        # The last run asked for (start, end, head) and its bytes.
        self.last: tuple[int, int, bytes, bytes] | None = None

    def trim(self, position: int) -> bool:
        """Forget the events before `position`; False when nothing encoded is left."""
        cut = position - self.start
        if cut <= 0:
            return True
        if cut >= len(self.offsets) - 1:
            return False
        del self.offsets[:cut]
        del self.data[: self.offsets[0] - self.origin]
        self.origin = self.offsets[0]
        self.start = position
        self.last = None
        return True


class _Feed:
    """The live events of one key range, shared by the streams watching it. Positions count every
    event the feed was ever given; `events[0]` is at position `base`."""

    __slots__ = ("base", "encodings", "events", "idle", "keys", "sizes", "trim_at", "watchers")

    def __init__(self, keys: KeyRange) -> None:
        self.keys = keys
        self.events: list[Event] = []
        self.base = 0
        # sizes[i]: the running total of _event_size of the events before events[i] (one more entry).
        self.sizes = [0]
        self.watchers: set[_Watcher] = set()
        self.idle: dict[_Watcher, None] = {}  # waiting for an event, in no queue
        self.encodings: dict[Hashable, _Encoding] = {}
        self.trim_at = _TRIM_EVERY

    @property
    def end(self) -> int:
        return self.base + len(self.events)

    def append(self, events: Sequence[Event]) -> None:
        sizes = self.sizes
        total = sizes[-1]
        for event in events:
            total += _event_size(event)
            sizes.append(total)
        self.events.extend(events)

    def trim(self, position: int) -> None:
        """Drop the events before `position`."""
        drop = position - self.base
        if drop <= 0:
            return
        del self.events[:drop]
        del self.sizes[:drop]
        self.base = position
        for key, encoding in list(self.encodings.items()):
            if not encoding.trim(position):
                del self.encodings[key]

    def encoded(self, start: int, end: int, encode: Callable[[Event], bytes], head: bytes) -> bytes | None:
        """`head`, then encode(event) of the events from `start` to `end`; None if the feed has
        dropped them since. Each event is encoded once per `encode` function (its key in the cache:
        pass the same function each time), and the last result is kept: the streams of a round
        mostly send the same run with the same head."""
        if start < self.base:
            return None
        encoding = self.encodings.get(encode)
        if encoding is None:
            encoding = self.encodings[encode] = _Encoding(start)
        elif start < encoding.start:  # before the cached run: not worth keeping
            events = self.events[start - self.base : end - self.base]
            return b"".join([head, *(encode(event) for event in events)])
        last = encoding.last
        if last is not None and last[0] == start and last[1] == end and last[2] == head:
            return last[3]
        offsets = encoding.offsets
        done = encoding.start + len(offsets) - 1
        if done < end:
            data = encoding.data
            total = offsets[-1]
            for event in self.events[done - self.base : end - self.base]:
                piece = encode(event)
                data += piece
                total += len(piece)
                offsets.append(total)
        low = offsets[start - encoding.start] - encoding.origin
        high = offsets[end - encoding.start] - encoding.origin
        result = b"".join((head, memoryview(encoding.data)[low:high]))
        encoding.last = (start, end, head, result)
        return result


@dataclass(frozen=True, slots=True)
class SharedEvents:
    """The events of a live message as a run of the feed they came from, which other streams of the
    same key range send too: `encoded` makes their bytes once for all of them."""

    feed: _Feed
    start: int
    end: int

    def encoded(self, encode: Callable[[Event], bytes], head: bytes = b"") -> bytes | None:
        """`head`, then encode(event) of each event of the run, concatenated; None once the feed
        has dropped the run (encode `events` then). Each event is encoded once per feed and
        `encode` function: pass the same function object every time (it keys the cache)."""
        return self.feed.encoded(self.start, self.end, encode, head)


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One message of a stream; see WatchResponse in the contract."""

    revision: int
    events: Sequence[Event] = ()
    initial_entries: Sequence[Entry] = ()
    initial_state_complete: bool = False
    cancel: WatchCancel | None = None
    # Set on live event messages: `events` as a run of a feed shared with other streams.
    shared: SharedEvents | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class WatchSpec:
    key: str
    prefix: bool = False
    start_revision: int = 0
    include_initial_state: bool = False
    progress_interval_ms: int = 0

    def key_range(self) -> KeyRange:
        return KeyRange.prefix(self.key) if self.prefix else KeyRange.single(self.key)


# Where a watcher is: sending (or replaying, or woken), waiting for an event, waiting for its turn.
_ACTIVE, _IDLE, _QUEUED, _GONE = range(4)


class _Watcher:
    __slots__ = (
        "buffer_limit",
        "closing",
        "cursor",
        "feed",
        "interval_s",
        "last_sent",
        "state",
        "ticket",
        "timer",
        "turn",
        "waiter",
    )

    def __init__(self, feed: _Feed, buffer_limit: int, *, closing: bool) -> None:
        self.feed = feed
        self.cursor = feed.end  # the feed position of the next event to send
        self.buffer_limit = buffer_limit
        self.state = _ACTIVE
        self.ticket = 0  # which of its entries in the hub's queue is the live one
        self.turn = True  # may send now, without waiting in the queue
        self.waiter: asyncio.Future[None] | None = None
        self.closing = closing
        self.interval_s = 0.0
        self.last_sent = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class WatchHub:
    def __init__(self, store: Store, settings: WatchSettings, limits: Limits) -> None:
        self._store = store
        self._settings = settings
        self._limits = limits
        self._watchers: set[_Watcher] = set()
        self._feeds: dict[KeyRange, _Feed] = {}
        # Streams with events to send, waiting for their turn, first in first out; an entry whose
        # ticket is not its watcher's any more is skipped.
        self._next: deque[tuple[_Watcher, int]] = deque()
        # The round being handed out, when it started, when the last one ended, and the pause
        # before the next one.
        self._round: deque[tuple[_Watcher, int]] | None = None
        self._round_started = 0.0  # time.perf_counter(), as every time the hub measures
        self._round_ended = 0.0
        self._gap_s = 0.0
        # The pause after a round, in rounds' durations; the loop thread's CPU time at the start
        # of the last pause and of the last round.
        self._pause_ratio = _MIN_PAUSE_RATIO
        self._pause_cpu = 0.0
        self._round_cpu = 0.0
        # The last pass: when, and how many turns it gave; what one turn costs, smoothed.
        self._pass_at = 0.0
        self._pass_turns = 0
        self._turn_s = _PASS_S / 64
        self._start_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        store.add_listener(self._publish)

    @property
    def active(self) -> int:
        return len(self._watchers)

    def _publish(self, events: Sequence[Event]) -> None:
        for feed in self._feeds.values():
            keys = feed.keys
            matching = [event for event in events if keys.contains(event.key)]
            if not matching:
                continue
            feed.append(matching)
            if feed.idle:
                for watcher in feed.idle:
                    self._enqueue(watcher)
                feed.idle.clear()
            if len(feed.events) >= feed.trim_at:
                self._trim(feed)
        if self._next:
            self._schedule_round()

    def _trim(self, feed: _Feed) -> None:
        """Drop what no stream of the feed needs, and what is more than a buffer behind (the streams
        that still needed it are slow consumers, ended when they next look)."""
        needed = min((watcher.cursor for watcher in feed.watchers), default=feed.end)
        feed.trim(max(needed, feed.end - self._settings.buffer_events))
        feed.trim_at = len(feed.events) + _TRIM_EVERY

    def _enqueue(self, watcher: _Watcher) -> None:
        watcher.state = _QUEUED
        watcher.ticket += 1
        self._next.append((watcher, watcher.ticket))

    def _schedule_round(self) -> None:
        """Start the next round once the one in progress is over, the pause after it passed and
        the event loop has caught up with the rest of its work (or the pause reached its bound)."""
        if self._round is not None or self._start_scheduled or self._loop is None:
            return
        self._start_scheduled = True
        delay = self._round_ended + self._gap_s - time.perf_counter()
        if delay > 0:
            self._loop.call_later(delay, self._probe, None)
        else:
            self._loop.call_soon(self._probe, time.perf_counter())

    def _probe(self, scheduled: float | None) -> None:
        """Start the round if the loop ran this call within _IDLE_PASS_S of asking (little else
        to do); otherwise look again in the next pass of the loop."""
        if self._loop is None:
            return
        now = time.perf_counter()
        idle = scheduled is not None and now - scheduled < _IDLE_PASS_S
        if not idle and now - self._round_ended < _MAX_PAUSE_S:
            self._loop.call_soon(self._probe, now)
            return
        self._start_scheduled = False
        if self._round is not None:
            return
        self._round, self._next = self._next, deque()
        self._round_started = now
        self._round_cpu = time.thread_time()
        self._pass_turns = 0
        self._pass()

    def _pass(self) -> None:
        """Give the next streams of the round their turn; the rest in the next pass of the loop,
        after whatever else became ready meanwhile (other calls, the sends just started)."""
        queue = self._round
        if queue is None or self._loop is None:
            return
        now = time.perf_counter()
        if self._pass_turns:
            # What the turns of the last pass took, with whatever else ran meanwhile: a loop
            # busy with other calls gets smaller passes.
            cost = (now - self._pass_at) / self._pass_turns
            self._turn_s += (cost - self._turn_s) / 4
        if not queue:
            # Every stream of the round has run its turn: pause in proportion to what it took,
            # longer when the loop's thread was busy with other work during the last pause.
            cpu = time.thread_time()
            paused = self._round_started - self._round_ended
            if paused > 0:
                busy = (self._round_cpu - self._pause_cpu) / paused
                if busy > _BUSY:
                    self._pause_ratio = min(self._pause_ratio * 1.5, _MAX_PAUSE_RATIO)
                elif busy < _BUSY / 2:
                    self._pause_ratio = max(self._pause_ratio / 1.25, _MIN_PAUSE_RATIO)
            self._gap_s = min((now - self._round_started) * self._pause_ratio, _MAX_PAUSE_S)
            self._round = None
            self._round_ended = now
            self._pause_cpu = cpu
            if self._next:
                self._schedule_round()
            return
        turns = max(_MIN_TURNS, min(_MAX_TURNS, int(_PASS_S / max(self._turn_s, 1e-6))))
        given = 0
        while queue and given < turns:
            watcher, ticket = queue.popleft()
            if watcher.state != _QUEUED or watcher.ticket != ticket:
                continue
            watcher.state = _ACTIVE
            watcher.turn = True
            watcher.wake()
            given += 1
        self._pass_at = now
        self._pass_turns = given
        self._loop.call_soon(self._pass)

    def _progress_due(self, watcher: _Watcher) -> None:
        watcher.timer = None
        if watcher.state != _IDLE:
            return  # armed again when it is idle again
        due = watcher.last_sent + watcher.interval_s
        if self._loop is not None and self._loop.time() < due - _TIMER_SLACK_S:
            watcher.timer = self._loop.call_at(due, self._progress_due, watcher)
            return
        del watcher.feed.idle[watcher]
        watcher.state = _ACTIVE
        watcher.wake()

    async def _wait(self, watcher: _Watcher) -> None:
        waiter = watcher.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            watcher.waiter = None

    def close(self) -> None:
        """End every stream with a SHUTDOWN message (at its next step)."""
        self._closing = True
        for watcher in self._watchers:
            watcher.closing = True
            if watcher.state in (_IDLE, _QUEUED):
                watcher.feed.idle.pop(watcher, None)
                watcher.state = _ACTIVE
                watcher.wake()

    def validate(self, spec: WatchSpec) -> None:
        if not spec.key and not spec.prefix:
            raise InvalidArgument("key", "must not be empty unless prefix is set")
        if len(spec.key.encode()) > self._limits.max_key_bytes:
            raise InvalidArgument("key", f"is over the limit of {self._limits.max_key_bytes} bytes")
        if spec.start_revision < 0:
            raise InvalidArgument("start_revision", "must not be negative")
        if spec.include_initial_state and spec.start_revision:
            raise InvalidArgument("include_initial_state", "cannot be combined with start_revision")
        if spec.progress_interval_ms < 0:
            raise InvalidArgument("progress_interval_ms", "must not be negative")

    async def watch(self, spec: WatchSpec) -> AsyncIterator[WatchMessage]:
        """The messages of one stream. After a message with `cancel`, the stream ends."""
        self.validate(spec)
        if self._settings.max_streams and len(self._watchers) >= self._settings.max_streams:
            raise ResourceExhausted(f"too many watch streams: the limit is {self._settings.max_streams}")
        self._loop = asyncio.get_running_loop()
        keys = spec.key_range()
        feed = self._feeds.get(keys)
        if feed is None:
            feed = self._feeds[keys] = _Feed(keys)
        watcher = _Watcher(feed, self._settings.buffer_events, closing=self._closing)
        feed.watchers.add(watcher)
        self._watchers.add(watcher)
        try:
            registered_at = self._store.revision
            delivered = registered_at
            if spec.include_initial_state:
                history = self._initial_state(keys, registered_at)
            elif spec.start_revision:
                delivered = max(registered_at, spec.start_revision - 1)
                history = self._replay(keys, spec.start_revision, registered_at)
            else:
                history = _nothing()
            async for message in history:
                yield message
                if message.cancel:
                    return
            interval = max(
                spec.progress_interval_ms or self._settings.progress_interval_ms, _MIN_PROGRESS_INTERVAL_MS
            )
            watcher.interval_s = interval / 1000
            async for message in self._live(watcher, delivered):
                yield message
        finally:
            self._remove(watcher)

    def _remove(self, watcher: _Watcher) -> None:
        watcher.state = _GONE
        if watcher.timer is not None:
            watcher.timer.cancel()
            watcher.timer = None
        feed = watcher.feed
        feed.idle.pop(watcher, None)
        feed.watchers.discard(watcher)
        self._watchers.discard(watcher)
        if not feed.watchers and self._feeds.get(feed.keys) is feed:
            del self._feeds[feed.keys]

    async def _initial_state(self, keys: KeyRange, revision: int) -> AsyncIterator[WatchMessage]:
        after: str | None = None
        while True:
            try:
                page = await self._store.range(
                    keys,
                    revision=revision,
                    after=after,
                    limit=_REPLAY_CHUNK,
                    keys_only=False,
                    now_ms=wall_clock_ms(),
                )
            except Compacted as error:
                yield self._cancel(CancelReason.COMPACTED, revision + 1, str(error))
                return
            chunks = self._within_budget(page.entries, _entry_size) or [()]
            for index, chunk in enumerate(chunks):
                complete = not page.more and index == len(chunks) - 1
                yield WatchMessage(revision, initial_entries=chunk, initial_state_complete=complete)
            if not page.more or not page.entries:
                return
            after = page.entries[-1].key

    async def _replay(self, keys: KeyRange, start: int, end: int) -> AsyncIterator[WatchMessage]:
        while start <= end:
            try:
                events = await self._store.events(
                    keys, start_revision=start, end_revision=end, limit=_REPLAY_CHUNK
                )
            except Compacted as error:
                yield self._cancel(CancelReason.COMPACTED, start, str(error))
                return
            if not events:
                return
            for chunk in self._within_budget(events, _event_size):
                yield WatchMessage(chunk[-1].revision, events=chunk)
            start = events[-1].revision + 1

    async def _live(self, watcher: _Watcher, delivered: int) -> AsyncIterator[WatchMessage]:
        loop = asyncio.get_running_loop()
        feed = watcher.feed
        watcher.last_sent = loop.time()
        while True:
            if watcher.closing:
                yield self._cancel(CancelReason.SHUTDOWN, delivered + 1, "the server is shutting down")
                return
            if feed.end - watcher.cursor > watcher.buffer_limit:
                yield self._cancel(
                    CancelReason.SLOW_CONSUMER,
                    delivered + 1,
                    f"the stream fell more than {watcher.buffer_limit} events behind",
                )
                return
            # Skip what was delivered already: replayed, or before the start revision asked for.
            events = feed.events
            index = watcher.cursor - feed.base
            while index < len(events) and events[index].revision <= delivered:
                index += 1
            watcher.cursor = feed.base + index
            if index < len(events):
                if not watcher.turn:
                    self._enqueue(watcher)
                    self._schedule_round()
                    await self._wait(watcher)
                    continue
                watcher.turn = False
                message = self._take(watcher)
                # The header revision is delivered too: a resume starts after it.
                delivered = max(message.events[-1].revision, message.revision)
                yield message
                watcher.last_sent = loop.time()
                continue
            due = watcher.last_sent + watcher.interval_s
            if loop.time() >= due - _TIMER_SLACK_S:
                # Nothing is pending, and the store announces every commit to the hub before its
                # revision can be read: every event up to the current revision was delivered.
                delivered = max(delivered, self._store.revision)
                yield WatchMessage(self._store.revision)
                watcher.last_sent = loop.time()
                continue
            watcher.state = _IDLE
            feed.idle[watcher] = None
            if watcher.timer is None:
                watcher.timer = loop.call_at(due, self._progress_due, watcher)
            await self._wait(watcher)

    def _take(self, watcher: _Watcher) -> WatchMessage:
        """The next message of the watcher's pending events, within one message's count and size
        budget (one event at least); its header revision is the store's when nothing is left."""
        feed = watcher.feed
        start = watcher.cursor - feed.base
        last = min(len(feed.events), start + _MAX_EVENTS_PER_MESSAGE)
        sizes = feed.sizes
        end = bisect.bisect_right(sizes, sizes[start] + self._limits.max_response_bytes, start + 1, last + 1)
        end = max(end - 1, start + 1)
        events = feed.events[start:end]
        watcher.cursor = feed.base + end
        revision = self._store.revision if end == len(feed.events) else events[-1].revision
        return WatchMessage(
            revision, events=events, shared=SharedEvents(feed, feed.base + start, feed.base + end)
        )

    def _within_budget(self, items: Sequence[T], size_of: Callable[[T], int]) -> list[Sequence[T]]:
        """`items` cut into consecutive chunks that each fit one message's count and size budget."""
        chunks: list[Sequence[T]] = []
        start = size = 0
        for index, item in enumerate(items):
            item_size = size_of(item)
            if index > start and (
                index - start >= _MAX_EVENTS_PER_MESSAGE or size + item_size > self._limits.max_response_bytes
            ):
                chunks.append(items[start:index])
                start, size = index, 0
            size += item_size
        if start < len(items):
            chunks.append(items[start:])
        return chunks

    def _cancel(self, reason: CancelReason, resume_revision: int, message: str) -> WatchMessage:
        # The store discards the events at or below its compact revision: the oldest revision a
        # stream can still deliver is the next one.
        cancel = WatchCancel(reason, self._store.compact_revision + 1, resume_revision, message)
        return WatchMessage(self._store.revision, cancel=cancel)


# Bytes of a message besides keys and values, per event or entry (revisions, version, timestamp).
_ITEM_OVERHEAD = 64


def _entry_size(entry: Entry) -> int:
    return len(entry.key.encode()) + len(entry.value) + _ITEM_OVERHEAD


def _event_size(event: Event) -> int:
    """The bytes an event takes in a message, its previous entry included (sent on request)."""
    size = len(event.key.encode()) + _ITEM_OVERHEAD
    for entry in (event.entry, event.prev):
        if entry is not None:
            size += _entry_size(entry)
    return size


async def _nothing() -> AsyncIterator[WatchMessage]:
    return
    yield
