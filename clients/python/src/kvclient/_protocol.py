"""The protocol logic shared by Client and AsyncClient, without any I/O.

Request building, response conversion, error mapping, the retry rule, channel settings and the
watch state machine live here, so that the two clients differ only in how they wait.
"""

from __future__ import annotations

import enum
import json
import math
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import grpc
from google.protobuf import timestamp_pb2

from kv.v1 import kv_pb2
from kvclient.errors import (
    HistoryCompacted,
    InvalidArgument,
    KvError,
    ServerError,
    SlowConsumer,
    Unavailable,
    error_for_status,
)
from kvclient.models import (
    DeleteResult,
    Entry,
    EventType,
    Limits,
    ListResult,
    PutItem,
    PutManyResult,
    PutOutcome,
    PutResult,
    RetryPolicy,
    ServerStatus,
    Tls,
    WatchEvent,
    WatchProgress,
)

VERSION: Final = "0.1.0"
DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_TIMEOUT: Final = 10.0


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
"""The sentinel for "use the client's default" (e.g. ``timeout=DEFAULT``)."""

Timeout = float | None | _Default
Value = str | bytes | bytearray | memoryview
Ttl = float | int | timedelta | None
ChannelOptions = Sequence[tuple[str, Any]]
Metadata = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- timeouts


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The timeout of one call: the per-call value, or the client's default."""
    value = default if timeout is DEFAULT else timeout
    if value is not None and (not isinstance(value, (int, float)) or value <= 0):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {value!r}")
    return value


class Deadline:
    """The end of a call and of its retries, on the monotonic clock."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        """Seconds left (never negative), ``None`` for no deadline."""
        if self._end is None:
            return None
        return max(0.0, self._end - self._clock())


# --------------------------------------------------------------------------- retries

RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
"""The codes a safe call is retried on: the server could not be reached or is restarting.

The clients never cancel a unary call themselves, so CANCELLED can only come from the server or
the transport; servers stopping gracefully cancel the calls in flight, which is UNAVAILABLE in all
but name."""

WATCH_RESUMABLE_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""The codes that end a watch stream but let it resume from the last delivered revision."""


def backoff(policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """The delay before retry number ``attempt`` (0-based): exponential, capped, with jitter."""
    cap = min(policy.max_backoff, policy.initial_backoff * policy.multiplier ** min(attempt, 64))
    return cap / 2 + rand() * cap / 2


def retry_delay(
    code: grpc.StatusCode,
    *,
    idempotent: bool,
    attempt: int,
    policy: RetryPolicy,
    deadline: Deadline,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """How long to wait before retrying a failed unary call, or ``None`` not to retry.

    The rule: only UNAVAILABLE (and CANCELLED by the server) is retried, only for a call that is
    safe to repeat (reads, and writes conditional on a mod_revision or a version), within
    ``policy.max_attempts`` and without passing the deadline.
    """
    if code not in RETRYABLE_CODES or not idempotent or attempt + 1 >= policy.max_attempts:
        return None
    delay = backoff(policy, attempt, rand)
    remaining = deadline.remaining()
    if remaining is not None and delay >= remaining:
        return None
    return delay


def error_from_rpc(error: grpc.RpcError) -> KvError:
    """The KvError for a failed call (the server's message kept as it was)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else None
    return error_for_status(code or grpc.StatusCode.UNKNOWN, details or "")


def rpc_code(error: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    return code or grpc.StatusCode.UNKNOWN


# --------------------------------------------------------------------------- channel


def channel_options(
    tls: Tls | None, extra: ChannelOptions = (), target: str | None = None
) -> list[tuple[str, Any]]:
    """The options of the client's channel: quick reconnection after a server restart."""
    options: dict[str, Any] = {
        "grpc.primary_user_agent": f"kv-client-python/{VERSION}",
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.min_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 2000,
    }
    if tls is not None and tls.server_name:
        options["grpc.ssl_target_name_override"] = tls.server_name
    if target is not None and is_multi_address(target):
        options["grpc.service_config"] = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        # The authority (and the TLS name, unless Tls.server_name says otherwise): the first server.
        options["grpc.default_authority"] = target.split(":", 1)[1].split(",")[0]
    options.update(dict(extra))
    return list(options.items())


def normalize_tls(tls: Tls | bool | None) -> Tls | None:
    """``True`` means TLS with the system's roots; ``False``/``None`` plaintext."""
    if tls is True:
        return Tls()
    if tls is False or tls is None:
        return None
    if (tls.certificate_chain is None) != (tls.private_key is None):
        raise InvalidArgument("Tls needs both certificate_chain and private_key, or neither")
    return tls


def channel_credentials(tls: Tls) -> grpc.ChannelCredentials:
    """The channel credentials for TLS (and mTLS when a client certificate is given)."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )


def call_metadata(token: str | None) -> Metadata:
    """The metadata sent with every call: the bearer token, when the client has one."""
    if token is None:
        return ()
    if not token or any(c in token for c in "\r\n"):
        raise InvalidArgument("token must be a non-empty single line")
    return (("authorization", f"Bearer {token}"),)


def normalize_target(target: str | Sequence[str]) -> str:
    """The gRPC target for one ``host:port`` (a leading ``grpc://`` is tolerated), or for several
    servers of one cluster, given as a list or separated by commas.

    Several servers share one channel that spreads calls over them (round robin) and stops
    using one that cannot be reached, so the client fails over by itself; the calls that were in
    flight on a server that died fail UNAVAILABLE and are retried by the retry rule (reads and
    revision-conditional writes). Their host names are resolved once, here.
    """
    parts = [target] if isinstance(target, str) else list(target)
    if not all(isinstance(part, str) for part in parts):
        raise InvalidArgument("target must be 'host:port' or a list of them")
    addresses = [_strip_scheme(address) for part in parts for address in part.split(",") if address.strip()]
    if not addresses:
        raise InvalidArgument("target must be a non-empty 'host:port' string")
    if len(addresses) == 1:
        return addresses[0]
    return _multi_address_target(addresses)


def _strip_scheme(address: str) -> str:
    address = address.strip()
    for scheme in ("grpc://", "http://"):
        if address.startswith(scheme):
            return address[len(scheme) :]
    return address


def _multi_address_target(addresses: list[str]) -> str:
    """An ``ipv4:`` or ``ipv6:`` target naming every address (gRPC's static resolvers)."""
    resolved: list[tuple[int, str, int]] = []
    for address in addresses:
        host, separator, port = address.rpartition(":")
        if not separator or not port.isdigit() or not host:
            raise InvalidArgument(f"target {address!r} is not 'host:port'")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_STREAM
            )[0]
        except socket.gaierror as error:
            raise Unavailable(f"cannot resolve {host!r}: {error}") from None
        resolved.append((family, str(sockaddr[0]), int(port)))
    families = {family for family, _, _ in resolved}
    if families == {socket.AF_INET}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for _, ip, port in resolved)
    if families == {socket.AF_INET6}:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for _, ip, port in resolved)
    raise InvalidArgument("several targets must all be IPv4 or all IPv6 addresses")


def is_multi_address(target: str) -> bool:
    return target.startswith(("ipv4:", "ipv6:"))


# --------------------------------------------------------------------------- requests


def _check_key(key: object, *, allow_empty: bool = False) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    if not key and not allow_empty:
        raise InvalidArgument("key must not be empty")
    return key


def _check_revision(name: str, value: int | None) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value <= 0:
        raise InvalidArgument(f"{name} must be a positive revision, got {value}")
    return value


def encode_value(value: Value) -> bytes:
    """``str`` values are encoded as UTF-8; bytes-like values pass through unchanged."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"value must be str or bytes, not {type(value).__name__}")


def ttl_to_ms(ttl: Ttl) -> int:
    """A TTL in seconds (or a timedelta) as whole milliseconds; ``None``/0 means none."""
    if ttl is None:
        return 0
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"ttl must be seconds (float) or a timedelta, not {type(ttl).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgument(f"ttl must be a non-negative number of seconds, got {ttl!r}")
    if seconds == 0:
        return 0
    return max(1, round(seconds * 1000))


def put_request(
    key: str,
    value: Value,
    *,
    ttl: Ttl,
    if_absent: bool,
    if_present: bool,
    if_mod_revision: int | None,
    if_version: int | None,
    return_previous: bool,
    content_type: str | None = None,
) -> tuple[kv_pb2.PutRequest, bytes]:
    """The PutRequest, and the value's bytes (to report the entry after the write)."""
    data = encode_value(value)
    if content_type is not None and not isinstance(content_type, str):
        raise TypeError(f"content_type must be str, not {type(content_type).__name__}")
    request = kv_pb2.PutRequest(
        key=_check_key(key),
        ttl_ms=ttl_to_ms(ttl),
        if_absent=bool(if_absent),
        if_present=bool(if_present),
        if_mod_revision=_check_revision("if_mod_revision", if_mod_revision),
        if_version=_check_revision("if_version", if_version),
        return_previous=bool(return_previous),
        content_type=content_type or "",
    )
    if data:
        if isinstance(value, str):
            request.value = value
        else:
            request.value_bytes = data
    return request, data


MAX_BATCH_PUTS: Final = 1000
"""The most puts one BatchPut call may carry (the server's limit, in the contract)."""

PutManyItem = PutItem | tuple[str, Value]


def put_item(item: PutManyItem) -> PutItem:
    """A PutItem; a ``(key, value)`` pair is ``PutItem(key, value)``."""
    if isinstance(item, PutItem):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return PutItem(item[0], item[1])  # type: ignore[arg-type]
    raise TypeError(f"an item of put_many must be a PutItem or a (key, value) pair, not {item!r}")


def batch_put_requests(
    items: Iterable[PutManyItem], batch_size: int
) -> list[tuple[kv_pb2.BatchPutRequest, list[bytes]]]:
    """The BatchPutRequests of ``put_many`` (at most ``batch_size`` puts each), each with the
    values' bytes. An invalid item raises before anything is sent, naming it (``items[3]``)."""
    valid = isinstance(batch_size, int) and not isinstance(batch_size, bool)
    if not valid or not 0 < batch_size <= MAX_BATCH_PUTS:
        raise InvalidArgument(f"batch_size must be an int from 1 to {MAX_BATCH_PUTS}, got {batch_size!r}")
    puts: list[tuple[kv_pb2.PutRequest, bytes]] = []
    for index, raw in enumerate(items):
        try:
            item = put_item(raw)
            puts.append(
                put_request(
                    item.key,
                    item.value,
                    ttl=item.ttl,
                    if_absent=item.if_absent,
                    if_present=item.if_present,
                    if_mod_revision=item.if_mod_revision,
                    if_version=item.if_version,
                    return_previous=item.return_previous,
                    content_type=item.content_type,
                )
            )
        except InvalidArgument as error:
            raise InvalidArgument(f"items[{index}]: {error.message}") from None
        except TypeError as error:
            raise TypeError(f"items[{index}]: {error}") from None
    return [
        (
            kv_pb2.BatchPutRequest(puts=[request for request, _ in puts[start : start + batch_size]]),
            [data for _, data in puts[start : start + batch_size]],
        )
        for start in range(0, len(puts), batch_size)
    ]


def batch_put_is_idempotent(request: kv_pb2.BatchPutRequest) -> bool:
    """A batch is safe to repeat when every put of it is (conditional on a revision)."""
    return all(put_is_idempotent(put) for put in request.puts)


_STATUS_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}


def put_outcomes(
    request: kv_pb2.BatchPutRequest, response: kv_pb2.BatchPutResponse, values: list[bytes]
) -> list[PutOutcome]:
    """The PutOutcomes of one BatchPut call, in request order."""
    if len(response.results) != len(request.puts):
        raise ServerError(f"the server answered {len(response.results)} results for {len(request.puts)} puts")
    outcomes = []
    for put, result, value in zip(request.puts, response.results, values, strict=True):
        if result.WhichOneof("result") == "put":
            outcomes.append(PutOutcome(put.key, result=put_result(result.put, value)))
        else:
            code = _STATUS_CODES.get(result.error.code, grpc.StatusCode.UNKNOWN)
            outcomes.append(PutOutcome(put.key, error=error_for_status(code, result.error.message)))
    return outcomes


class PutMany:
    """The BatchPut calls of one ``put_many`` (built and checked up front), and the result that
    their responses add up to."""

    def __init__(self, items: Iterable[PutManyItem], batch_size: int) -> None:
        self.calls = batch_put_requests(items, batch_size)
        self._outcomes: list[PutOutcome] = []
        self._revision = 0

    def add(
        self, request: kv_pb2.BatchPutRequest, values: list[bytes], response: kv_pb2.BatchPutResponse
    ) -> None:
        self._outcomes.extend(put_outcomes(request, response, values))
        self._revision = max(self._revision, response.header.revision)

    def result(self) -> PutManyResult:
        return PutManyResult(tuple(self._outcomes), self._revision)


def put_is_idempotent(request: kv_pb2.PutRequest) -> bool:
    """A put is safe to repeat when it is conditional on a mod_revision or a version."""
    return request.if_mod_revision > 0 or request.if_version > 0


def delete_request(
    key: str,
    *,
    prefix: bool,
    allow_missing: bool,
    if_mod_revision: int | None,
    if_version: int | None,
    return_previous: bool,
) -> kv_pb2.DeleteRequest:
    """The DeleteRequest (an empty key is allowed with ``prefix``: every key)."""
    return kv_pb2.DeleteRequest(
        key=_check_key(key, allow_empty=prefix),
        prefix=bool(prefix),
        allow_missing=bool(allow_missing),
        if_mod_revision=_check_revision("if_mod_revision", if_mod_revision),
        if_version=_check_revision("if_version", if_version),
        return_previous=bool(return_previous),
    )


def delete_is_idempotent(request: kv_pb2.DeleteRequest) -> bool:
    """A delete is safe to repeat when it is conditional on a mod_revision or a version."""
    return request.if_mod_revision > 0 or request.if_version > 0


def get_request(key: str) -> kv_pb2.GetRequest:
    """The GetRequest."""
    return kv_pb2.GetRequest(key=_check_key(key))


def list_request(
    prefix: str,
    *,
    start_key: str,
    end_key: str,
    page_size: int | None,
    keys_only: bool,
    include_count: bool,
) -> kv_pb2.ListRequest:
    """The ListRequest of the first page (the same fields are sent for every page)."""
    for name, text in (("prefix", prefix), ("start_key", start_key), ("end_key", end_key)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be str, not {type(text).__name__}")
    if page_size is not None and (not isinstance(page_size, int) or page_size <= 0):
        raise InvalidArgument(f"page_size must be a positive int, got {page_size!r}")
    return kv_pb2.ListRequest(
        prefix=prefix,
        start_key=start_key,
        end_key=end_key,
        page_size=page_size or 0,
        keys_only=bool(keys_only),
        include_count=bool(include_count),
    )


def check_limit(limit: int | None) -> int | None:
    """``limit`` is ``None`` (everything) or a positive number of entries."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise InvalidArgument(f"limit must be a positive int, got {limit!r}")
    return limit


class ListWalk:
    """The state of a listing walked page by page (one snapshot, restarted if it expires).

    The driver loop: ``while (request := walk.next_request()) is not None: walk.add(response)``
    and ``walk.restart()`` when a page answers OUT_OF_RANGE (at most ``MAX_RESTARTS`` times).
    """

    MAX_RESTARTS: Final = 2

    def __init__(self, first: kv_pb2.ListRequest, limit: int | None) -> None:
        self._first = first
        self._limit = check_limit(limit)
        self._restarts = 0
        self._reset()

    def _reset(self) -> None:
        self._entries: list[Entry] = []
        self._token = ""
        self._revision = 0
        self._count: int | None = None
        self._done = False
        self._truncated = False

    def next_request(self) -> kv_pb2.ListRequest | None:
        """The request of the next page, or ``None`` when the walk is complete."""
        if self._done:
            return None
        request = kv_pb2.ListRequest()
        request.CopyFrom(self._first)
        request.page_token = self._token
        return request

    def add(self, response: kv_pb2.ListResponse) -> None:
        """Take one page."""
        if not self._token:
            self._revision = response.header.revision
            if self._first.include_count:
                self._count = response.count
        self._entries.extend(entry_from_pb(e) for e in response.entries)
        self._token = response.next_page_token
        if self._limit is not None and len(self._entries) >= self._limit:
            self._truncated = len(self._entries) > self._limit or bool(self._token)
            del self._entries[self._limit :]
            self._done = True
        elif not self._token:
            self._done = True

    def restart(self, error: KvError) -> None:
        """Start over after the snapshot expired (OUT_OF_RANGE); re-raise when out of tries."""
        if not self._token or self._restarts >= self.MAX_RESTARTS:
            raise error
        self._restarts += 1
        self._reset()

    def result(self) -> ListResult:
        """The ListResult."""
        return ListResult(tuple(self._entries), self._revision, self._count, self._truncated)


# --------------------------------------------------------------------------- responses


def datetime_from_pb(ts: timestamp_pb2.Timestamp) -> datetime:
    """An aware UTC datetime."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def entry_from_pb(entry: kv_pb2.Entry, value: bytes | None = None) -> Entry:
    """An Entry; ``value`` replaces the (absent) value of a put's entry."""
    if value is None:
        content = entry.WhichOneof("content")
        if content == "value":
            value = entry.value.encode("utf-8")
        elif content == "value_bytes":
            value = entry.value_bytes
        else:
            value = b""
    return Entry(
        key=entry.key,
        value=value,
        create_revision=entry.create_revision,
        mod_revision=entry.mod_revision,
        version=entry.version,
        expires_at=datetime_from_pb(entry.expire_time) if entry.HasField("expire_time") else None,
        content_type=entry.content_type,
    )


def put_result(response: kv_pb2.PutResponse, value: bytes) -> PutResult:
    """The PutResult (the entry carries the value that was written)."""
    return PutResult(
        revision=response.header.revision,
        created=response.created,
        entry=entry_from_pb(response.entry, value),
        prev_entry=entry_from_pb(response.prev_entry) if response.HasField("prev_entry") else None,
    )


def get_result(response: kv_pb2.GetResponse) -> Entry:
    """The Entry that was read."""
    return entry_from_pb(response.entry)


def delete_result(response: kv_pb2.DeleteResponse) -> DeleteResult:
    """The DeleteResult."""
    return DeleteResult(
        revision=response.header.revision,
        deleted=response.deleted,
        prev_entries=tuple(entry_from_pb(e) for e in response.prev_entries),
    )


def status_result(response: kv_pb2.StatusResponse) -> ServerStatus:
    """The ServerStatus."""
    limits = response.limits
    return ServerStatus(
        revision=response.header.revision,
        server_version=response.server_version,
        server_id=response.server_id,
        store=response.store,
        compact_revision=response.compact_revision,
        key_count=response.key_count,
        limits=Limits(
            max_key_bytes=limits.max_key_bytes,
            max_value_bytes=limits.max_value_bytes,
            default_page_size=limits.default_page_size,
            max_page_size=limits.max_page_size,
            default_progress_interval=limits.default_progress_interval_ms / 1000,
        ),
        started_at=(datetime_from_pb(response.started_time) if response.HasField("started_time") else None),
    )


_EVENT_TYPES: Final = {
    kv_pb2.Event.TYPE_PUT: EventType.PUT,
    kv_pb2.Event.TYPE_DELETE: EventType.DELETE,
    kv_pb2.Event.TYPE_EXPIRE: EventType.EXPIRE,
}


def event_from_pb(event: kv_pb2.Event) -> WatchEvent:
    """A WatchEvent."""
    try:
        kind = _EVENT_TYPES[event.type]
    except KeyError:
        raise KvError(f"the server sent an event of unknown type {event.type}") from None
    return WatchEvent(
        type=kind,
        entry=entry_from_pb(event.entry),
        prev_entry=entry_from_pb(event.prev_entry) if event.HasField("prev_entry") else None,
    )


# --------------------------------------------------------------------------- watch

WatchItem = WatchEvent | WatchProgress


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """What a watch asked for."""

    key: str
    prefix: bool
    start_revision: int | None
    include_initial_state: bool
    include_previous: bool
    progress_interval_ms: int
    progress: bool


def watch_options(
    key: str,
    *,
    prefix: bool,
    start_revision: int | None,
    include_initial_state: bool,
    include_previous: bool,
    progress_interval: float | None,
    progress: bool,
) -> WatchOptions:
    """Validate the arguments of ``watch``."""
    _check_key(key, allow_empty=prefix)
    start = None if start_revision in (None, 0) else _check_revision("start_revision", start_revision)
    if start is not None and include_initial_state:
        raise InvalidArgument("start_revision cannot be combined with include_initial_state")
    interval_ms = 0
    if progress_interval is not None:
        if not isinstance(progress_interval, (int, float)) or progress_interval <= 0:
            raise InvalidArgument("progress_interval must be a positive number of seconds")
        interval_ms = max(1, round(progress_interval * 1000))
    return WatchOptions(
        key=key,
        prefix=bool(prefix),
        start_revision=start,
        include_initial_state=bool(include_initial_state),
        include_previous=bool(include_previous),
        progress_interval_ms=interval_ms,
        progress=bool(progress),
    )


@dataclass(frozen=True, slots=True)
class _Mark:
    """Internal: every matching event up to ``revision`` has been delivered (not yielded)."""

    revision: int


class WatchTracker:
    """The state machine of a resumable watch, fed by the client that does the I/O.

    The client's loop (see ``Client.watch``)::

        while (item := tracker.pop()) is None:          # what to yield next, if anything
            if tracker.needs_status:                    # first: Status (errors propagate)
                tracker.on_status(<Status revision>)
            open a stream with tracker.request(), read one message:
              a message:     tracker.on_message(message)  # may raise HistoryCompacted
                             if tracker.reconnect: cancel the stream, sleep(tracker.on_end())
              an error:      sleep(tracker.on_error(error))   # raises when it cannot resume
              the end:       sleep(tracker.on_end())
        yield item

    It resumes from one past the last revision delivered (or the server's resume_revision),
    drops any event below a revision it already delivered, buffers the initial state until it
    is complete (so a broken initial state is fetched again, never half delivered), and gives up
    after ``policy.watch_resume_timeout`` seconds without a message.
    """

    def __init__(
        self,
        options: WatchOptions,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.options = options
        self._policy = policy
        self._clock = clock
        self._rand = rand
        # The start_revision of the next stream; None until known.
        self.next_revision: int | None = options.start_revision
        # Every matching event up to it has been handed to the caller.
        self.revision = 0
        self._pending: deque[WatchItem | _Mark] = deque()
        self._initial_pending = options.include_initial_state
        self._initial: list[Entry] = []
        self.reconnect = False
        self._established = False
        self._last_error: KvError = Unavailable()
        self._failures = 0
        self._failing_since: float | None = None

    @property
    def needs_status(self) -> bool:
        """True until the server answered once: the first step of a watch is a Status call.

        It tells a watch "from now" the current revision, and makes a watch whose server cannot
        be reached at all fail at once (with the Status call's error, after its own retries)
        instead of waiting for ``watch_resume_timeout``; only an established watch resumes.
        """
        return not self._established

    def on_status(self, revision: int) -> None:
        """Take the store's current revision (from Status): a watch "from now" starts after it."""
        self._established = True
        if self.next_revision is None and not self._initial_pending:
            self.next_revision = revision + 1
            self.revision = max(self.revision, revision)

    def request(self) -> kv_pb2.WatchRequest:
        """The request of the next stream."""
        self.reconnect = False
        opts = self.options
        request = kv_pb2.WatchRequest(
            key=opts.key,
            prefix=opts.prefix,
            include_previous=opts.include_previous,
            progress_interval_ms=opts.progress_interval_ms,
        )
        if self._initial_pending:
            request.include_initial_state = True
            self._initial.clear()
        else:
            request.start_revision = self.next_revision or 0
        return request

    def pop(self) -> WatchItem | None:
        """The next item for the caller, or ``None`` when a message must be read first."""
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, WatchEvent):
                if not item.initial:
                    self.revision = max(self.revision, item.revision)
                return item
            self.revision = max(self.revision, item.revision)
            if isinstance(item, WatchProgress):
                return item
        return None

    def on_message(self, message: kv_pb2.WatchResponse) -> None:
        """Take one message of the stream (events never repeat a revision)."""
        self._established = True
        header = message.header.revision
        if message.HasField("cancel"):
            self._on_cancel(message.cancel)  # not progress: repeated cancels still give up
            return
        self._failures = 0
        self._failing_since = None
        mark: WatchItem | _Mark = WatchProgress(header) if self.options.progress else _Mark(header)
        if message.initial_entries or message.initial_state_complete:
            if not self._initial_pending:
                return  # a stray initial state after resuming: nothing to deliver
            self._initial.extend(entry_from_pb(e) for e in message.initial_entries)
            if message.initial_state_complete:
                self._pending.extend(WatchEvent(EventType.PUT, e, None, True) for e in self._initial)
                self._initial.clear()
                self._initial_pending = False
                self.next_revision = header + 1
                self._pending.append(mark)
            return
        if self._initial_pending:
            return  # events before the initial state is complete cannot be placed
        for pb in message.events:
            revision = pb.entry.mod_revision
            if self.next_revision is not None and revision < self.next_revision:
                continue  # already delivered before a resume
            self._pending.append(event_from_pb(pb))
            self.next_revision = revision + 1
        if header <= 0:
            return
        if self.next_revision is None or header + 1 > self.next_revision:
            self.next_revision = header + 1
        self._pending.append(mark if not message.events else _Mark(header))

    def _on_cancel(self, cancel: kv_pb2.WatchCancel) -> None:
        reason = cancel.reason
        if reason == kv_pb2.WatchCancel.REASON_COMPACTED:
            raise HistoryCompacted(
                cancel.message,
                code=grpc.StatusCode.OUT_OF_RANGE,
                compact_revision=cancel.compact_revision or None,
            )
        if cancel.resume_revision > 0 and not self._initial_pending:
            self.next_revision = max(self.next_revision or 0, cancel.resume_revision)
        if reason == kv_pb2.WatchCancel.REASON_SLOW_CONSUMER:
            self._last_error = SlowConsumer(cancel.message, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        else:
            self._last_error = Unavailable(cancel.message, code=grpc.StatusCode.UNAVAILABLE)
        self.reconnect = True

    def on_error(self, error: grpc.RpcError) -> float:
        """The delay before resuming after a stream failed; raises when it cannot resume."""
        code = rpc_code(error)
        mapped = error_from_rpc(error)
        if self.reconnect and code in WATCH_RESUMABLE_CODES:
            return self._failed(self._last_error)  # the status that follows a cancel
        if code == grpc.StatusCode.OUT_OF_RANGE:
            raise HistoryCompacted(mapped.message, code=code)
        if code not in WATCH_RESUMABLE_CODES:
            raise mapped
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            mapped = SlowConsumer(mapped.message, code=code)
        return self._failed(mapped)

    def on_end(self) -> float:
        """The delay before resuming after a cancel, or a stream the server ended without one."""
        if self.reconnect:
            return self._failed(self._last_error)
        return self._failed(Unavailable("the server ended the watch stream"))

    def _failed(self, error: KvError) -> float:
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > self._policy.watch_resume_timeout:
            raise error
        delay = 0.0 if self._failures == 0 else backoff(self._policy, self._failures - 1, self._rand)
        self._failures += 1
        return delay
