"""The cluster store: kv's keys, history and revision live in etcd, so any number of kv servers
can serve the same data. A server in this mode keeps nothing of its own but caches it can rebuild.

Layout in etcd, under a prefix (default "kv/") so that one etcd can hold other data too:

- `<prefix><key>`: one etcd key per kv key (the key's UTF-8 bytes), its value an envelope.
- `<prefix>\\xffdeleted`: the deletion marker (below). 0xFF never occurs in UTF-8, so no kv key
  sorts at or after `<prefix>\\xff`: that is where kv's data ends.

Envelope (format 1), the etcd value of a kv key:

    offset  size  field
    0       1     format version, 0x01
    1       8     expire_at_ms, unsigned big-endian, milliseconds since the epoch; 0 = never
    9       2     n, the length of content_type in bytes, unsigned big-endian
    11      n     content_type, UTF-8
    11+n    ...   the value: every remaining byte

A value whose first byte is 0x02-0x1F is an envelope of a format this server does not know (an
error, never misread); a value whose first byte is anything else (0x00, 0x20-0xFF, or an empty
value) was not written by kv and is read as a plain value without deadline or content type.

Revisions. etcd's revision minus one is kv's: a fresh etcd is at revision 1, which kv reports as
0. Every kv write is one etcd transaction that changes exactly one kv key, so the revision grows
by exactly 1 per key changed (as long as nothing else writes to the same etcd). create_revision
and mod_revision are etcd's minus one; version is etcd's. A prefix deletion is one transaction per
key, each conditional on the key's mod_revision, in key order: it is not atomic across keys.

Writes read the key (linearizably), decide as the planner does (conditions, expiry first), then
commit with a transaction that compares the key's mod_revision (or its absence) with what was
read, retrying with the state the failed transaction returns. A write is acknowledged only after
this server's watch of etcd has delivered its event to the listeners (see below).

TTLs. The absolute deadline is in the envelope, so an expired key is invisible at once, and every
kv server's reaper deletes due keys (ExpireOp, a conditional delete). Each key with a TTL also
gets an etcd lease of its own that outlives the deadline, so etcd removes the key even when no kv
server runs. A DELETE in etcd is reported as EXPIRE when the deleted envelope had a deadline,
unless the same transaction wrote the deletion marker, which kv does when a client deletes a key
that has a deadline: the distinction is in etcd, so every server and every replay agree.

Listeners: a background etcd watch on kv's prefix (with previous values) turns etcd's events
into kv events and hands them to the listeners in revision order, whichever kv server made the
change. `revision` is the last revision the listeners have seen. History (`events`) is an etcd
watch from the requested revision; listings read etcd's MVCC snapshot at the requested revision.

Reads are linearizable unless `get(..., serializable=True)` asks for the member's local state.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import logging
import math
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aetcd import rpc  # type: ignore[import-untyped]
from sortedcontainers import SortedSet

from kvserver.domain import (
    NO_EXPIRY,
    Compacted,
    CompactOp,
    CompactResult,
    ConditionFailed,
    DeleteOp,
    DeleteResult,
    Entry,
    Event,
    EventType,
    ExpireOp,
    ExpireResult,
    FutureRevision,
    KeyNotFound,
    KeyRange,
    KvError,
    Page,
    PutOp,
    PutResult,
    StorageFailure,
    StoreStats,
    WriteOp,
    WriteResult,
    wall_clock_ms,
)
from kvserver.store.base import EventListener, write_outcomes

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "kv/"
ENVELOPE_VERSION = 1
_ENVELOPE = struct.Struct(">BQH")
_UNKNOWN_VERSIONS = range(2, 0x20)
_MAX_CONTENT_TYPE_BYTES = 0xFFFF

# etcd's gRPC metadata that makes a member refuse a request (and end a watch) while it has no
# leader, instead of letting it hang: such a refusal happens before anything is proposed.
_REQUIRE_LEADER = (("hasleader", "true"),)
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
_PAGE = 1000
_MAX_PAGES = 1_000_000
_MAX_ATTEMPTS = 10_000
_MAX_CAS_ATTEMPTS = 100
_FIRST_BACKOFF_S = 0.02
_MAX_BACKOFF_S = 0.5
_LEASE_MARGIN_S = 1
_MAX_LEASE_TTL_S = 9_000_000_000  # etcd's MaxLeaseTTL (about 285 years)
_MAX_PENDING_REVOKES = 10_000
_REVISION_SAMPLE_EVERY_MS = 1000
_MAX_REVISION_SAMPLES = 200_000

# Details of etcd and gRPC errors that prove the request was refused before etcd proposed it, so
# a write can be retried without risk of applying it twice.
_UNSENT = (
    "no leader",
    "proposal dropped",
    "too many requests",
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
)


class EnvelopeError(StorageFailure):
    """An etcd value under kv's prefix is an envelope this server cannot read."""


@dataclass(frozen=True, slots=True)
class Envelope:
    value: bytes
    expire_at_ms: int = NO_EXPIRY
    content_type: str = ""


def encode_envelope(value: bytes, expire_at_ms: int = NO_EXPIRY, content_type: str = "") -> bytes:
    content = content_type.encode()
    if len(content) > _MAX_CONTENT_TYPE_BYTES:
        raise ValueError("content_type is too long for the envelope")
    return _ENVELOPE.pack(ENVELOPE_VERSION, expire_at_ms, len(content)) + content + value


def decode_envelope(data: bytes) -> Envelope:
    """The envelope in `data`; a value that kv did not write is a plain value (see the module)."""
    if not data or data[0] == 0 or data[0] >= 0x20:
        return Envelope(bytes(data))
    if data[0] in _UNKNOWN_VERSIONS:
        raise EnvelopeError(f"envelope format {data[0]} is newer than this server (it reads format 1)")
    if len(data) < _ENVELOPE.size:
        raise EnvelopeError("truncated envelope")
    _, expire_at_ms, length = _ENVELOPE.unpack_from(data)
    end = _ENVELOPE.size + length
    if end > len(data):
        raise EnvelopeError("truncated envelope: its content type runs past the end")
    try:
        content_type = bytes(data[_ENVELOPE.size : end]).decode()
    except UnicodeDecodeError:
        raise EnvelopeError("the envelope's content type is not UTF-8") from None
    return Envelope(bytes(data[end:]), expire_at_ms, content_type)


def _bytes_prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for every key that starts with `prefix` (b"\\0": no end)."""
    for index in range(len(prefix) - 1, -1, -1):
        if prefix[index] < 0xFF:
            return prefix[:index] + bytes([prefix[index] + 1])
    return b"\0"


class _Layout:
    """Where kv's keys are in etcd."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self.data_end = self.prefix + b"\xff"
        self.marker = self.prefix + b"\xffdeleted"
        self.space_end = _bytes_prefix_end(self.prefix)

    def key(self, key: str) -> bytes:
        return self.prefix + key.encode()

    def user_key(self, etcd_key: bytes) -> str | None:
        """The kv key of an etcd key, or None if it is not one (the marker, a foreign key)."""
        if not etcd_key.startswith(self.prefix) or etcd_key.startswith(self.data_end):
            return None
        try:
            key = etcd_key[len(self.prefix) :].decode()
        except UnicodeDecodeError:
            return None
        return key or None

    def bounds(self, keys: KeyRange, after: str | None) -> tuple[bytes, bytes]:
        if after is not None and after >= keys.start:
            start = self.key(after) + b"\0"
        else:
            start = self.key(keys.start)
        end = self.key(keys.end) if keys.end is not None else self.data_end
        return start, end


class _Deadlines:
    """Every key with a deadline, as the listener last saw it: for the reaper and next_expiry."""

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[int, int, int]] = {}  # key -> (deadline, etcd mod, lease)
        self._order: SortedSet[tuple[int, str]] = SortedSet()

    def __len__(self) -> int:
        return len(self._by_key)

    def set(self, key: str, deadline: int, mod_revision: int, lease: int) -> None:
        self.discard(key)
        if deadline != NO_EXPIRY:
            self._by_key[key] = (deadline, mod_revision, lease)
            self._order.add((deadline, key))

    def discard(self, key: str) -> None:
        old = self._by_key.pop(key, None)
        if old is not None:
            self._order.discard((old[0], key))

    def first(self) -> int | None:
        return self._order[0][0] if self._order else None

    def due(self, now_ms: int, limit: int) -> list[tuple[str, int, int]]:
        """Up to `limit` keys whose deadline is at or before `now_ms`: (key, etcd mod, lease)."""
        found: list[tuple[str, int, int]] = []
        for _, key in self._order.irange(maximum=(now_ms, chr(0x10FFFF))):
            if len(found) >= limit:
                break
            _, mod_revision, lease = self._by_key[key]
            found.append((key, mod_revision, lease))
        return found


class _Member:
    """One etcd endpoint: its channel and stubs."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel = rpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        self.kv = rpc.KVStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)


class _EtcdCompacted(StorageFailure):
    """etcd: the revision asked for is compacted (callers turn it into Compacted)."""


class _EtcdFutureRevision(StorageFailure):
    """etcd: the revision asked for is in the future (callers turn it into FutureRevision)."""


class _LeaseNotFound(StorageFailure):
    """etcd: the lease of a put no longer exists."""


@dataclass
class _Replay:
    """A history replay in progress: etcd revisions `next`..`last`, up to `limit` kv events."""

    keys: KeyRange
    next: int
    last: int
    limit: int
    found: list[Event] = field(default_factory=list)


class _WatchEnded(Exception):
    """etcd ended a watch stream (no leader, the member stopped): resume elsewhere."""


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """`host:port,host:port` (or a list); an `http://` scheme is accepted and dropped."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = []
    for item in items:
        endpoint = item.strip()
        for scheme in ("http://", "https://"):
            endpoint = endpoint.removeprefix(scheme)
        if endpoint:
            parsed.append(endpoint.rstrip("/"))
    if not parsed:
        raise ValueError("no etcd endpoint given")
    return parsed


class EtcdStore:
    name = "etcd"

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        request_timeout_s: float = 5.0,
        operation_timeout_s: float = 10.0,
        ack_timeout_s: float = 10.0,
        open_timeout_s: float = 20.0,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self._layout = _Layout(prefix)
        self._request_timeout_s = request_timeout_s
        self._operation_timeout_s = operation_timeout_s
        self._ack_timeout_s = ack_timeout_s
        self._open_timeout_s = open_timeout_s
        self._members: list[_Member] = []
        self._active = 0
        self._etcd_revision = 0  # the last etcd revision the listeners have seen
        self._compact_revision = 0  # kv's
        self._listeners: list[EventListener] = []
        self._deadlines = _Deadlines()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = itertools.count()
        self._sample_times: list[int] = []
        self._sample_revisions: list[int] = []
        self._follower: asyncio.Task[None] | None = None
        self._revoker: asyncio.Task[None] | None = None
        self._revokes: asyncio.Queue[int] = asyncio.Queue(_MAX_PENDING_REVOKES)
        self._closing = asyncio.Event()
        self._closed = False
        self._failure: str | None = None

    @classmethod
    async def open(
        cls, endpoints: str | Sequence[str], *, prefix: str = DEFAULT_PREFIX, **options: Any
    ) -> EtcdStore:
        store = cls(endpoints, prefix=prefix, **options)
        try:
            await store._open()
        except BaseException:
            await store.close()
            raise
        return store

    async def _open(self) -> None:
        self._members = [_Member(endpoint) for endpoint in self._endpoints]
        deadline = self._deadline(self._open_timeout_s)
        snapshot = await self._load_deadlines(deadline)
        self._etcd_revision = snapshot
        self._compact_revision = max(await self._probe_compact_revision(snapshot, deadline) - 1, 0)
        self._sample(wall_clock_ms())
        self._follower = asyncio.create_task(self._follow(), name="etcd-watch")
        self._revoker = asyncio.create_task(self._revoke_forever(), name="etcd-lease-revoker")
        log.info(
            "opened etcd store on %s (prefix %r) at revision %d, compact revision %d, %d keys with a TTL",
            ",".join(self._endpoints),
            self._layout.prefix.decode(errors="replace"),
            self.revision,
            self._compact_revision,
            len(self._deadlines),
        )

    async def _load_deadlines(self, deadline: float) -> int:
        """Index the deadline of every key that has a lease; returns the etcd revision read at."""
        snapshot = 0
        start = self._layout.prefix
        for _ in range(_MAX_PAGES):
            response = await self._range(
                start,
                self._layout.data_end,
                revision=snapshot,
                limit=_PAGE,
                keys_only=True,
                deadline=deadline,
            )
            snapshot = snapshot or int(response.header.revision)
            leased = [kv for kv in response.kvs if kv.lease]
            if leased:
                values = await self._range(
                    leased[0].key, leased[-1].key + b"\0", revision=snapshot, deadline=deadline
                )
                for kv in values.kvs:
                    self._index(kv)
            if not response.more or not response.kvs:
                return snapshot
            start = response.kvs[-1].key + b"\0"
        raise StorageFailure("too many keys to index")

    async def _probe_compact_revision(self, upper: int, deadline: float) -> int:
        """etcd's compact revision: the oldest revision it can still read (binary search)."""
        probe = self._layout.marker + b"\0probe"

        async def readable(revision: int) -> bool:
            try:
                await self._range(probe, None, revision=revision, count_only=True, deadline=deadline)
            except _EtcdCompacted:
                return False
            return True

        low, high = 1, max(upper, 1)
        if await readable(low):
            return low
        # readable(high) holds: `upper` was just read.
        for _ in range(64):
            if high - low <= 1:
                break
            middle = (low + high) // 2
            if await readable(middle):
                high = middle
            else:
                low = middle
        return high

    # Properties and listeners.

    @property
    def revision(self) -> int:
        return max(self._etcd_revision - 1, 0)

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    # Reads.

    async def get(self, key: str, now_ms: int, *, serializable: bool = False) -> tuple[int, Entry | None]:
        """The key's entry and the revision it was read at.

        Linearizable by default: the read reflects every write acknowledged before it started,
        through any kv server. `serializable` reads the connected etcd member's local state
        instead: no quorum round trip, and it answers even when the member is cut off from its
        cluster, but it may miss recent writes.
        """
        self._check_open()
        response = await self._range(
            self._layout.key(key), None, serializable=serializable, deadline=self._deadline()
        )
        entry = self._entry(response.kvs[0]) if response.kvs else None
        if entry is not None and entry.expired(now_ms):
            entry = None
        return max(int(response.header.revision) - 1, 0), entry

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
        self._check_open()
        start, end = self._layout.bounds(keys, after)
        entries: list[Entry] = []
        deadline = self._deadline()
        for _ in range(_MAX_PAGES):
            if start >= end or len(entries) > limit:
                break
            response = await self._range_at(
                start, end, revision, limit=limit + 1 - len(entries), deadline=deadline
            )
            for kv in response.kvs:
                entry = self._entry(kv)
                if entry is not None and not entry.expired(now_ms):
                    entries.append(entry.without_value() if keys_only else entry)
            if not response.more or not response.kvs:
                break
            start = response.kvs[-1].key + b"\0"
        return Page(revision, tuple(entries[:limit]), more=len(entries) > limit)

    async def count(self, keys: KeyRange, *, revision: int, now_ms: int) -> int:
        """Counts keys from their metadata; only keys with a lease (a TTL) need their envelope."""
        self._check_open()
        start, end = self._layout.bounds(keys, None)
        total = 0
        deadline = self._deadline()
        for _ in range(_MAX_PAGES):
            if start >= end:
                break
            response = await self._range_at(
                start, end, revision, limit=_PAGE, keys_only=True, deadline=deadline
            )
            leased = []
            for kv in response.kvs:
                if self._layout.user_key(kv.key) is None:
                    continue
                if kv.lease:
                    leased.append(kv)
                else:
                    total += 1
            if leased:
                values = await self._range_at(
                    leased[0].key, leased[-1].key + b"\0", revision, deadline=deadline
                )
                for kv in values.kvs:
                    entry = self._entry(kv)
                    if entry is not None and kv.lease and not entry.expired(now_ms):
                        total += 1
            if not response.more or not response.kvs:
                break
            start = response.kvs[-1].key + b"\0"
        return total

    async def events(
        self, keys: KeyRange, *, start_revision: int, end_revision: int, limit: int
    ) -> list[Event]:
        """History from etcd: a watch from `start_revision` over the whole key space, so that every
        revision has an event and the replay knows when it has reached `end_revision`."""
        self._check_open()
        if start_revision <= self._compact_revision:
            raise Compacted(start_revision, self._compact_revision)
        end = min(end_revision, self.revision)
        if start_revision > end or limit <= 0:
            return []
        replay = _Replay(keys, start_revision + 1, end + 1, limit)  # etcd revisions
        deadline = self._deadline()
        delay = _FIRST_BACKOFF_S
        for _ in range(_MAX_ATTEMPTS):
            index = self._active
            try:
                async with asyncio.timeout_at(deadline):
                    await self._replay_from(self._members[index], replay)
                return replay.found[:limit]
            except _EtcdCompacted as error:
                raise Compacted(start_revision, self._compact_revision) from error
            except TimeoutError:
                raise StorageFailure("etcd did not replay the history in time") from None
            except (rpc.AioRpcError, _WatchEnded) as error:
                self._rotate(index, error)
            delay = await self._backoff(delay, deadline, "replaying history")
        raise StorageFailure("could not replay the history from etcd")

    async def _replay_from(self, member: _Member, replay: _Replay) -> None:
        """Add the events of `replay.next` and on to `replay`, until it is complete.

        The watch starts one revision early (and skips it): etcd accepts a watch from its compact
        revision but may drop a deletion at exactly that revision, and this way etcd refuses
        exactly the start revisions kv considers compacted.
        """
        request = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=b"\0", range_end=b"\0", start_revision=replay.next - 1, prev_kv=True
            )
        )
        done = asyncio.Event()
        call = member.watch.Watch(_requests(request, done), metadata=_REQUIRE_LEADER)
        try:
            async for response in call:
                if response.compact_revision:
                    self._compacted_at(int(response.compact_revision))
                    raise _EtcdCompacted("history compacted")
                if response.canceled:
                    raise _WatchEnded(response.cancel_reason or "the watch was canceled")
                for revision, group in _by_revision(response.events):
                    if revision < replay.next:
                        continue
                    if revision > replay.last:
                        return
                    converted = self._convert(group, strict=True)
                    replay.found += [event for event in converted if replay.keys.contains(event.key)]
                    replay.next = revision + 1
                    if len(replay.found) >= replay.limit or revision >= replay.last:
                        return
        finally:
            done.set()
            call.cancel()
        raise _WatchEnded("the watch stream ended")

    async def revision_at(self, time_ms: int) -> int:
        index = bisect.bisect_left(self._sample_times, time_ms)
        if index == 0:
            return self._compact_revision
        return max(self._sample_revisions[index - 1], self._compact_revision)

    async def next_expiry(self) -> int | None:
        return self._deadlines.first()

    async def stats(self) -> StoreStats:
        self._check_open()
        response = await self._range(
            self._layout.prefix, self._layout.data_end, count_only=True, deadline=self._deadline()
        )
        return StoreStats(
            self.revision,
            self._compact_revision,
            int(response.count),
            {
                "etcd_revision": int(response.header.revision),
                "etcd_raft_term": int(response.header.raft_term),
                "etcd_endpoints": len(self._endpoints),
                "etcd_active_endpoint": self._active,
                "ttl_keys": len(self._deadlines),
            },
        )

    async def check(self) -> None:
        self._check_open()
        if self._follower is not None and self._follower.done():
            raise StorageFailure("the etcd watch has stopped")
        probe = self._layout.marker + b"\0probe"
        await self._range(probe, None, count_only=True, deadline=self._deadline(self._request_timeout_s))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        for task in (self._follower, self._revoker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_waiters("the store is closed")
        for member in self._members:
            await member.channel.close()
        log.info("closed etcd store at revision %d", self.revision)

    # Writes.

    async def write(self, op: WriteOp) -> WriteResult:
        self._check_open()
        if isinstance(op, PutOp):
            return await self._put(op)
        if isinstance(op, DeleteOp):
            return await (self._delete_prefix(op) if op.prefix else self._delete(op))
        if isinstance(op, ExpireOp):
            return await self._expire(op)
        return await self._compact(op)

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult | KvError]:
        # The writes go out concurrently, and etcd does not apply concurrent writes in submission
        # order (each takes several round trips to etcd): the ops of one call may commit in
        # another order, each still atomically.
        return write_outcomes(await asyncio.gather(*(self.write(op) for op in ops), return_exceptions=True))

    async def _put(self, op: PutOp) -> PutResult:
        deadline = self._deadline()
        key = self._layout.key(op.key)
        kv = await self._read_key(key, deadline)
        lease = 0
        lease_granted = False
        keep_lease = False  # the put used it, or may have: revoking it would delete the key
        try:
            for _ in range(_MAX_CAS_ATTEMPTS):
                current, kv = await self._live(op.key, kv, deadline)
                if not op.condition.holds_for(current):
                    raise ConditionFailed(op.key, op.condition, current)
                if op.expire_at_ms != NO_EXPIRY and not lease_granted:
                    lease = await self._grant_lease(op.expire_at_ms, deadline)
                    lease_granted = True
                envelope = encode_envelope(op.value, op.expire_at_ms, op.content_type)
                put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=envelope, lease=lease))
                try:
                    response = await self._txn(self._unchanged(key, kv), [put], key, deadline)
                except _LeaseNotFound:
                    lease, lease_granted = 0, False
                    continue
                except StorageFailure:
                    keep_lease = True  # the outcome is unknown
                    raise
                if not response.succeeded:
                    kv = _failed_range(response)
                    continue
                keep_lease = True
                etcd_revision = int(response.header.revision)
                revision = etcd_revision - 1
                entry = Entry(
                    key=op.key,
                    value=op.value,
                    create_revision=current.create_revision if current else revision,
                    mod_revision=revision,
                    version=current.version + 1 if current else 1,
                    expire_at_ms=op.expire_at_ms,
                    content_type=op.content_type,
                )
                if kv is not None and kv.lease and kv.lease != lease:
                    self._revoke_later(int(kv.lease))
                await self._seen(etcd_revision)
                return PutResult(revision, current is None, entry, current)
        finally:
            if lease and not keep_lease:
                self._revoke_later(lease)
        raise StorageFailure(f"key {op.key!r} changed too often to be written")

    async def _delete(self, op: DeleteOp) -> DeleteResult:
        deadline = self._deadline()
        key = self._layout.key(op.key)
        kv, revision = await self._read_key_at(key, deadline)
        for _ in range(_MAX_CAS_ATTEMPTS):
            current, kv = await self._live(op.key, kv, deadline)
            if not op.condition.holds_for(current):
                raise ConditionFailed(op.key, op.condition, current)
            if current is None:
                if not op.allow_missing:
                    raise KeyNotFound(op.key)
                return DeleteResult(max(revision, self.revision), ())
            response = await self._txn(self._unchanged(key, kv), self._deletion(key, current), key, deadline)
            if not response.succeeded:
                kv = _failed_range(response)
                continue
            if kv is not None and kv.lease:
                self._revoke_later(int(kv.lease))
            await self._seen(int(response.header.revision))
            return DeleteResult(int(response.header.revision) - 1, (current,))
        raise StorageFailure(f"key {op.key!r} changed too often to be deleted")

    async def _delete_prefix(self, op: DeleteOp) -> DeleteResult:
        """One conditional transaction per key, in key order (not atomic across keys)."""
        deadline = self._deadline()
        start, end = self._layout.bounds(KeyRange.prefix(op.key), None)
        deleted: list[Entry] = []
        last = 0
        snapshot = 0
        for _ in range(_MAX_PAGES):
            if start >= end:
                break
            page = await self._range(start, end, revision=snapshot, limit=_PAGE, deadline=deadline)
            snapshot = snapshot or int(page.header.revision)
            for scanned in page.kvs:
                user_key = self._layout.user_key(scanned.key)
                if user_key is None:
                    continue
                entry, revision = await self._delete_scanned(user_key, scanned, deadline)
                last = max(last, revision)
                if entry is not None:
                    deleted.append(entry)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        if last:
            await self._seen(last)
        return DeleteResult(last - 1 if last else max(snapshot - 1, self.revision), tuple(deleted))

    async def _delete_scanned(self, key: str, kv: Any, deadline: float) -> tuple[Entry | None, int]:
        """Delete one scanned key (or its newer version); returns it and the etcd revision."""
        etcd_key = self._layout.key(key)
        revision = 0
        for _ in range(_MAX_CAS_ATTEMPTS):
            current, kv = await self._live(key, kv, deadline)
            revision = max(revision, self._etcd_revision)
            if current is None:
                return None, revision
            response = await self._txn(
                self._unchanged(etcd_key, kv), self._deletion(etcd_key, current), etcd_key, deadline
            )
            if response.succeeded:
                if kv is not None and kv.lease:
                    self._revoke_later(int(kv.lease))
                return current, int(response.header.revision)
            kv = _failed_range(response)
        raise StorageFailure(f"key {key!r} changed too often to be deleted")

    def _deletion(self, key: bytes, current: Entry) -> list[Any]:
        ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))]
        if current.expire_at_ms != NO_EXPIRY:
            # The marker tells every reader that this deletion is a client's, not an expiry.
            ops.append(rpc.RequestOp(request_put=rpc.PutRequest(key=self._layout.marker, value=key)))
        return ops

    async def _expire(self, op: ExpireOp) -> ExpireResult:
        deadline = self._deadline()
        expired = 0
        last = 0
        for key, mod_revision, lease in self._deadlines.due(op.now_ms, op.limit):
            etcd_key = self._layout.key(key)
            compare = rpc.Compare(
                key=etcd_key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod_revision
            )
            delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=etcd_key))
            response = await self._txn(compare, [delete], None, deadline)
            if response.succeeded:  # otherwise the key changed (or another server expired it)
                expired += 1
                last = int(response.header.revision)
                if lease:
                    self._revoke_later(lease)
        if last:
            await self._seen(last)
        return ExpireResult(last - 1 if last else self.revision, expired)

    async def _compact(self, op: CompactOp) -> CompactResult:
        target = min(op.revision, self.revision)
        if target > self._compact_revision:
            request = rpc.CompactionRequest(revision=target + 1)
            try:
                await self._rpc(
                    lambda member, timeout: member.kv.Compact(
                        request, timeout=timeout, metadata=_REQUIRE_LEADER
                    ),
                    deadline=self._deadline(),
                    retry="always",
                )
            except _EtcdCompacted:  # another kv server compacted as far or further
                self._compact_revision = max(
                    self._compact_revision,
                    await self._probe_compact_revision(self._etcd_revision, self._deadline()) - 1,
                )
            else:
                self._compact_revision = max(self._compact_revision, target)
        return CompactResult(target)

    async def _live(self, key: str, kv: Any, deadline: float) -> tuple[Entry | None, Any]:
        """The key as a write sees it: an entry whose deadline has passed is first deleted, as its
        own revision (an EXPIRE), and the key is then absent."""
        for _ in range(_MAX_CAS_ATTEMPTS):
            if kv is None:
                return None, None
            entry = self._entry(kv)
            if entry is None or not entry.expired(wall_clock_ms()):
                return entry, kv
            etcd_key = self._layout.key(key)
            compare = self._unchanged(etcd_key, kv)
            delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=etcd_key))
            response = await self._txn(compare, [delete], etcd_key, deadline)
            if response.succeeded:
                if kv.lease:
                    self._revoke_later(int(kv.lease))
                await self._seen(int(response.header.revision))
                return None, None
            kv = _failed_range(response)
        raise StorageFailure(f"key {key!r} changed too often to be expired")

    def _unchanged(self, key: bytes, kv: Any) -> Any:
        """The compare that holds while the key is still as read (`kv`, or absent for None)."""
        if kv is None:
            return rpc.Compare(
                key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
            )
        return rpc.Compare(
            key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=int(kv.mod_revision)
        )

    async def _grant_lease(self, expire_at_ms: int, deadline: float) -> int:
        """A lease that ends after the deadline (0, none, for a deadline beyond etcd's longest
        lease: such a key is removed by the kv servers' reapers alone)."""
        ttl = max(math.ceil((expire_at_ms - wall_clock_ms()) / 1000), 0) + _LEASE_MARGIN_S
        if ttl > _MAX_LEASE_TTL_S:
            return 0
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=0)
        # A retried grant at worst leaves an unused lease, which expires by itself.
        response = await self._rpc(
            lambda member, timeout: member.lease.LeaseGrant(
                request, timeout=timeout, metadata=_REQUIRE_LEADER
            ),
            deadline=deadline,
            retry="always",
        )
        if response.error:
            raise StorageFailure(f"etcd did not grant a lease: {response.error}")
        return int(response.ID)

    def _revoke_later(self, lease: int) -> None:
        """Revoke a lease that no key uses any more (best effort: it expires anyway)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._revokes.put_nowait(lease)

    async def _revoke_forever(self) -> None:
        while True:
            await self._revoke(await self._revokes.get())

    async def _revoke(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        try:
            await self._rpc(
                lambda member, timeout: member.lease.LeaseRevoke(request, timeout=timeout),
                deadline=self._deadline(self._request_timeout_s),
                retry="always",
            )
        except StorageFailure as error:  # NOT_FOUND (expired already) included
            log.debug("could not revoke lease %x: %s", lease, error)

    # etcd requests.

    async def _read_key(self, key: bytes, deadline: float) -> Any:
        kv, _ = await self._read_key_at(key, deadline)
        return kv

    async def _read_key_at(self, key: bytes, deadline: float) -> tuple[Any, int]:
        """The key's etcd KeyValue (None if absent), read linearizably, and kv's revision."""
        response = await self._range(key, None, deadline=deadline)
        return (response.kvs[0] if response.kvs else None), int(response.header.revision) - 1

    async def _range(
        self,
        key: bytes,
        end: bytes | None,
        *,
        deadline: float,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
    ) -> Any:
        request = rpc.RangeRequest(
            key=key,
            range_end=end or b"",
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            serializable=serializable,
        )
        metadata = () if serializable else _REQUIRE_LEADER
        return await self._rpc(
            lambda member, timeout: member.kv.Range(request, timeout=timeout, metadata=metadata),
            deadline=deadline,
            retry="always",
        )

    async def _range_at(
        self,
        start: bytes,
        end: bytes,
        revision: int,
        *,
        deadline: float,
        limit: int = 0,
        keys_only: bool = False,
    ) -> Any:
        """A range of kv's revision `revision`, with etcd's errors as kv's."""
        try:
            return await self._range(
                start, end, revision=revision + 1, limit=limit, keys_only=keys_only, deadline=deadline
            )
        except _EtcdCompacted:
            compact = await self._probe_compact_revision(self._etcd_revision, self._deadline()) - 1
            self._compact_revision = max(self._compact_revision, compact)
            raise Compacted(revision, self._compact_revision) from None
        except _EtcdFutureRevision:
            raise FutureRevision(revision, self.revision) from None

    async def _txn(self, compare: Any, success: list[Any], key: bytes | None, deadline: float) -> Any:
        """A transaction: `success` if `compare` holds, else a read of `key`. A failure that may
        have been applied is StorageFailure; it is retried only when etcd surely did not take it."""
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=key))] if key is not None else []
        request = rpc.TxnRequest(compare=[compare], success=success, failure=failure)
        return await self._rpc(
            lambda member, timeout: member.kv.Txn(request, timeout=timeout, metadata=_REQUIRE_LEADER),
            deadline=deadline,
            retry="unsent",
        )

    async def _rpc(
        self,
        call: Callable[[_Member, float], Awaitable[T]],
        *,
        deadline: float,
        retry: Literal["always", "unsent"],
    ) -> T:
        """Run `call` on the active member; on failure move to the next member and retry (reads
        always, writes only while etcd surely did not take them) until `deadline`."""
        delay = _FIRST_BACKOFF_S
        last_error = "no attempt"
        for _ in range(_MAX_ATTEMPTS):
            if self._closed:
                raise StorageFailure("the store is closed")
            index = self._active
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                return await call(self._members[index], min(remaining, self._request_timeout_s))
            except rpc.AioRpcError as error:
                details = error.details() or ""
                code = error.code()
                if code == rpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
                    raise _EtcdCompacted(details) from None
                if code == rpc.StatusCode.OUT_OF_RANGE and "future revision" in details:
                    raise _EtcdFutureRevision(details) from None
                if code == rpc.StatusCode.NOT_FOUND and "lease not found" in details:
                    raise _LeaseNotFound(details) from None
                if not _transient(error):
                    raise StorageFailure(f"etcd: {details or code.name}") from None
                self._rotate(index, error)
                last_error = details or code.name
                if retry == "unsent" and not _unsent(error):
                    raise StorageFailure(
                        f"etcd did not confirm the write (it may or may not be applied): {last_error}"
                    ) from None
            delay = await self._backoff(delay, deadline, last_error)
        raise StorageFailure(f"etcd is unavailable: {last_error}")

    async def _backoff(self, delay: float, deadline: float, what: str) -> float:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise StorageFailure(f"etcd is unavailable: {what}")
        await asyncio.sleep(min(delay, remaining))
        return min(delay * 2, _MAX_BACKOFF_S)

    def _rotate(self, index: int, error: BaseException) -> None:
        """After a failure on member `index`, the next request goes to the next member."""
        if len(self._members) > 1 and self._active == index:
            self._active = (index + 1) % len(self._members)
            log.warning(
                "etcd %s failed (%s); using %s",
                self._members[index].endpoint,
                _describe(error),
                self._members[self._active].endpoint,
            )

    def _deadline(self, seconds: float | None = None) -> float:
        return asyncio.get_running_loop().time() + (
            seconds if seconds is not None else self._operation_timeout_s
        )

    def _check_open(self) -> None:
        if self._closed:
            raise StorageFailure("the store is closed")
        if self._failure is not None:
            raise StorageFailure(self._failure)

    # The watch that feeds the listeners.

    async def _follow(self) -> None:
        delay = _FIRST_BACKOFF_S
        while not self._closed:
            index = self._active
            try:
                async with contextlib.aclosing(self._watch_live(self._members[index])) as responses:
                    async for events in responses:
                        self._apply(events)
                        delay = _FIRST_BACKOFF_S
            except _EtcdCompacted:
                self._failure = (
                    f"the etcd history after revision {self.revision} was compacted before this server "
                    "could follow it: restart the server"
                )
                log.error("%s", self._failure)
                self._fail_waiters(self._failure)
                return
            except (rpc.AioRpcError, _WatchEnded) as error:
                if self._closed:
                    return
                log.warning(
                    "etcd watch on %s ended (%s); resuming", self._members[index].endpoint, _describe(error)
                )
                self._rotate(index, error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)

    async def _watch_live(self, member: _Member) -> AsyncGenerator[list[Any], None]:
        request = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=self._layout.prefix,
                range_end=self._layout.space_end,
                # From the last revision delivered, which _apply skips: see _replay_from.
                start_revision=max(self._etcd_revision, 1),
                prev_kv=True,
            )
        )
        call = member.watch.Watch(_requests(request, self._closing), metadata=_REQUIRE_LEADER)
        try:
            async for response in call:
                if response.compact_revision:
                    self._compacted_at(int(response.compact_revision))
                    raise _EtcdCompacted("compacted")
                if response.canceled:
                    raise _WatchEnded(response.cancel_reason or "the watch was canceled")
                if response.events:
                    yield list(response.events)
        finally:
            call.cancel()
        if not self._closed:
            raise _WatchEnded("the watch stream ended")

    def _apply(self, etcd_events: list[Any]) -> None:
        """Hand one watch response's events to the listeners, then release the writes they ack."""
        events: list[Event] = []
        last = self._etcd_revision
        for revision, group in _by_revision(etcd_events):
            if revision <= self._etcd_revision:
                continue  # already delivered (a resumed watch repeats nothing, but be safe)
            for event in group:
                key = self._layout.user_key(event.kv.key)
                if key is None:
                    continue
                if event.type == rpc.Event.PUT:
                    try:
                        envelope = decode_envelope(event.kv.value)
                    except EnvelopeError as error:
                        log.error("key %r: %s", key, error)
                        envelope = Envelope(bytes(event.kv.value))
                    self._deadlines.set(
                        key, envelope.expire_at_ms, int(event.kv.mod_revision), int(event.kv.lease)
                    )
                else:
                    self._deadlines.discard(key)
            events += self._convert(group, strict=False)
            last = revision
        self._etcd_revision = last
        self._sample(wall_clock_ms())
        if events:
            for listener in self._listeners:
                try:
                    listener(events)
                except Exception:
                    log.exception("an event listener failed")
        while self._waiters and self._waiters[0][0] <= self._etcd_revision:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _convert(self, group: Sequence[Any], *, strict: bool) -> list[Event]:
        """kv's events for the etcd events of one revision."""
        marked = any(event.kv.key == self._layout.marker for event in group)
        converted = []
        for event in group:
            key = self._layout.user_key(event.kv.key)
            if key is None:
                continue
            revision = int(event.kv.mod_revision) - 1
            prev = self._lenient_entry(event.prev_kv, strict) if event.HasField("prev_kv") else None
            if event.type == rpc.Event.PUT:
                entry = self._lenient_entry(event.kv, strict)
                converted.append(Event(EventType.PUT, revision, key, entry, prev))
            else:
                expired = not marked and prev is not None and prev.expire_at_ms != NO_EXPIRY
                converted.append(
                    Event(EventType.EXPIRE if expired else EventType.DELETE, revision, key, None, prev)
                )
        return converted

    async def _seen(self, etcd_revision: int) -> None:
        """Wait until the listeners have seen `etcd_revision` (bounded)."""
        if self._etcd_revision >= etcd_revision:
            return
        if self._failure is not None:
            raise StorageFailure(self._failure)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (etcd_revision, next(self._waiter_ids), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), self._ack_timeout_s)
        except TimeoutError:
            raise StorageFailure(
                f"the write was committed at revision {etcd_revision - 1}, but this server's etcd watch "
                f"did not deliver it within {self._ack_timeout_s:g} s"
            ) from None

    def _fail_waiters(self, reason: str) -> None:
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(StorageFailure(reason))
        self._waiters.clear()

    # Helpers.

    def _entry(self, kv: Any) -> Entry | None:
        key = self._layout.user_key(kv.key)
        if key is None:
            return None
        try:
            envelope = decode_envelope(kv.value)
        except EnvelopeError as error:
            raise EnvelopeError(f"key {key!r}: {error}") from None
        return Entry(
            key,
            envelope.value,
            int(kv.create_revision) - 1,
            int(kv.mod_revision) - 1,
            int(kv.version),
            envelope.expire_at_ms,
            envelope.content_type,
        )

    def _lenient_entry(self, kv: Any, strict: bool) -> Entry | None:
        """An entry of an event; the listener cannot stop at a bad envelope, so it logs it."""
        try:
            return self._entry(kv)
        except EnvelopeError as error:
            if strict:
                raise
            log.error("%s", error)
            key = self._layout.user_key(kv.key) or ""
            return Entry(
                key, bytes(kv.value), int(kv.create_revision) - 1, int(kv.mod_revision) - 1, int(kv.version)
            )

    def _index(self, kv: Any) -> None:
        key = self._layout.user_key(kv.key)
        if key is None:
            return
        try:
            envelope = decode_envelope(kv.value)
        except EnvelopeError as error:
            log.error("key %r: %s", key, error)
            return
        self._deadlines.set(key, envelope.expire_at_ms, int(kv.mod_revision), int(kv.lease))

    def _compacted_at(self, etcd_compact_revision: int) -> None:
        self._compact_revision = max(self._compact_revision, etcd_compact_revision - 1)

    def _sample(self, now_ms: int) -> None:
        """Remember which revision was current when, for revision_at (history retention by age)."""
        if self._sample_times and now_ms - self._sample_times[-1] < _REVISION_SAMPLE_EVERY_MS:
            self._sample_revisions[-1] = self.revision
            return
        self._sample_times.append(now_ms)
        self._sample_revisions.append(self.revision)
        if len(self._sample_times) > _MAX_REVISION_SAMPLES:
            del self._sample_times[: _MAX_REVISION_SAMPLES // 2]
            del self._sample_revisions[: _MAX_REVISION_SAMPLES // 2]


async def _requests(request: Any, done: asyncio.Event) -> AsyncIterator[Any]:
    """A watch's request stream: the create request, then open until `done`."""
    yield request
    await done.wait()


def _by_revision(events: Iterable[Any]) -> Iterable[tuple[int, list[Any]]]:
    """etcd events grouped by revision (a response never splits a revision)."""
    for revision, group in itertools.groupby(events, key=lambda event: int(event.kv.mod_revision)):
        yield revision, list(group)


def _failed_range(response: Any) -> Any:
    """The key's KeyValue as read by a transaction that failed its compare (None if absent)."""
    kvs = response.responses[0].response_range.kvs if response.responses else []
    return kvs[0] if kvs else None


def _transient(error: Any) -> bool:
    code = error.code()
    details = (error.details() or "").lower()
    return (
        code in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED, rpc.StatusCode.CANCELLED)
        or "leader changed" in details
        or any(marker in details for marker in _UNSENT)
    )


def _unsent(error: Any) -> bool:
    details = (error.details() or "").lower()
    return any(marker in details for marker in _UNSENT)


def _describe(error: BaseException) -> str:
    if isinstance(error, rpc.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


__all__ = ["DEFAULT_PREFIX", "Envelope", "EnvelopeError", "EtcdStore", "decode_envelope", "encode_envelope"]
