"""Watch streams: replay from history, optional initial state, live events, progress, resync.

The hub hears every committed batch from the store (in revision order, before the writes are
acknowledged) and hands each watcher the events of its key range. A watcher's stream drains all
its pending events into one message, so a busy stream sends fewer, larger messages instead of
falling behind. A watcher whose pending events exceed its buffer is ended with an explicit
SLOW_CONSUMER message naming the revision to resume from: never a silent gap.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Sequence
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


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One message of a stream; see WatchResponse in the contract."""

    revision: int
    events: Sequence[Event] = ()
    initial_entries: Sequence[Entry] = ()
    initial_state_complete: bool = False
    cancel: WatchCancel | None = None


@dataclass(frozen=True, slots=True)
class WatchSpec:
    key: str
    prefix: bool = False
    start_revision: int = 0
    include_initial_state: bool = False
    progress_interval_ms: int = 0

    def key_range(self) -> KeyRange:
        return KeyRange.prefix(self.key) if self.prefix else KeyRange.single(self.key)


@dataclass(eq=False)
class _Watcher:
    keys: KeyRange
    buffer_limit: int
    pending: list[Event] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    closing: bool = False

    def offer(self, events: Sequence[Event]) -> None:
        if self.overflowed:
            return
        matching = [event for event in events if self.keys.contains(event.key)]
        if not matching:
            return
        if len(self.pending) + len(matching) > self.buffer_limit:
            self.overflowed = True
            self.pending.clear()
        else:
            self.pending.extend(matching)
        self.wake.set()


class WatchHub:
    def __init__(self, store: Store, settings: WatchSettings, limits: Limits) -> None:
        self._store = store
        self._settings = settings
        self._limits = limits
        self._watchers: set[_Watcher] = set()
        self._closing = False
        store.add_listener(self._publish)

    @property
    def active(self) -> int:
        return len(self._watchers)

    def _publish(self, events: Sequence[Event]) -> None:
        for watcher in self._watchers:
            watcher.offer(events)

    def close(self) -> None:
        """End every stream with a SHUTDOWN message (at its next step)."""
        self._closing = True
        for watcher in self._watchers:
            watcher.closing = True
            watcher.wake.set()

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
        watcher = _Watcher(spec.key_range(), self._settings.buffer_events, closing=self._closing)
        self._watchers.add(watcher)
        try:
            registered_at = self._store.revision
            delivered = registered_at
            if spec.include_initial_state:
                history = self._initial_state(watcher.keys, registered_at)
            elif spec.start_revision:
                delivered = max(registered_at, spec.start_revision - 1)
                history = self._replay(watcher.keys, spec.start_revision, registered_at)
            else:
                history = _nothing()
            async for message in history:
                yield message
                if message.cancel:
                    return
            interval = max(
                spec.progress_interval_ms or self._settings.progress_interval_ms, _MIN_PROGRESS_INTERVAL_MS
            )
            async for message in self._live(watcher, delivered, interval / 1000):
                yield message
        finally:
            self._watchers.discard(watcher)

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

    async def _live(
        self, watcher: _Watcher, delivered: int, interval_s: float
    ) -> AsyncIterator[WatchMessage]:
        while True:
            if not watcher.pending and not watcher.overflowed and not watcher.closing:
                watcher.wake.clear()
                try:
                    await asyncio.wait_for(watcher.wake.wait(), interval_s)
                except TimeoutError:
                    # Events may have arrived while the wait was being cancelled: a progress
                    # message promises that every event up to its revision was delivered.
                    if not watcher.pending and not watcher.overflowed and not watcher.closing:
                        delivered = max(delivered, self._store.revision)
                        yield WatchMessage(self._store.revision)
                    continue
            if watcher.closing:
                yield self._cancel(CancelReason.SHUTDOWN, delivered + 1, "the server is shutting down")
                return
            if watcher.overflowed:
                yield self._cancel(
                    CancelReason.SLOW_CONSUMER,
                    delivered + 1,
                    f"the stream fell more than {watcher.buffer_limit} events behind",
                )
                return
            events = self._take(watcher, delivered)
            if events:
                revision = self._store.revision if not watcher.pending else events[-1].revision
                # The header revision is delivered too: a resume starts after it.
                delivered = max(events[-1].revision, revision)
                yield WatchMessage(revision, events=events)

    def _take(self, watcher: _Watcher, delivered: int) -> list[Event]:
        """The pending events not yet delivered, within one message's count and size budget."""
        taken: list[Event] = []
        size = 0
        index = 0
        for index, event in enumerate(watcher.pending):  # noqa: B007
            if event.revision <= delivered:
                continue
            event_size = _event_size(event)
            if taken and (
                len(taken) >= _MAX_EVENTS_PER_MESSAGE or size + event_size > self._limits.max_response_bytes
            ):
                break
            taken.append(event)
            size += event_size
        else:
            index = len(watcher.pending)
        del watcher.pending[:index]
        return taken

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
