"""The asyncio client. Its logic is in ``_protocol``; this module only does the I/O.

It mirrors ``_sync`` method for method, with the same docstrings (a test checks it). Each call's
``timeout`` is sent as the gRPC deadline (the server sees it too), hence the ASYNC109 exceptions.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import weakref
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Literal, Self, TypeVar, overload

import grpc
import grpc.aio

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvclient import _protocol as _p
from kvclient.errors import HistoryCompacted, KvError
from kvclient.models import (
    DeleteResult,
    Entry,
    Limits,
    ListResult,
    PutManyResult,
    PutResult,
    RetryPolicy,
    ServerStatus,
    Tls,
    WatchEvent,
    WatchProgress,
)

if TYPE_CHECKING:
    from kv.v1.kv_pb2_grpc import KeyValueAsyncStub

__all__ = ["AsyncClient", "AsyncWatch"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Item = TypeVar("_Item", WatchEvent, WatchEvent | WatchProgress)


class AsyncClient:
    """A client of the kv service for asyncio: every call is a coroutine.

    ``target`` is ``host:port`` (default ``127.0.0.1:50051``). ``timeout`` is the default time
    limit of each call in seconds (``None``: no limit); every method also takes its own
    ``timeout``. ``tls`` is ``True`` (TLS with the system's roots) or a :class:`Tls` (own roots,
    client certificate for mTLS); ``token`` is sent as ``authorization: Bearer <token>`` with
    every call. ``retry`` sets the backoff of retries; ``channel_options`` are extra gRPC
    channel arguments. The client holds one channel, reused by all calls, and is safe to share
    between tasks of the event loop that first uses it; close it (``await client.close()``), or
    use it as an async context manager.
    """

    def __init__(
        self,
        target: str | Sequence[str] = _p.DEFAULT_TARGET,
        *,
        timeout: float | None = _p.DEFAULT_TIMEOUT,
        tls: Tls | bool = False,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        channel_options: _p.ChannelOptions = (),
    ) -> None:
        self._target = _p.normalize_target(target)
        self._timeout = _p.resolve_timeout(timeout, None)
        self._tls = _p.normalize_tls(tls)
        self._metadata = _p.call_metadata(token)
        self._retry = retry or RetryPolicy()
        self._options = _p.channel_options(self._tls, channel_options, self._target)
        # grpc.aio channels belong to the event loop that makes them: made on first use.
        self._channel: grpc.aio.Channel | None = None
        self._stub_: KeyValueAsyncStub | None = None
        self._watches: weakref.WeakSet[AsyncWatch[WatchEvent] | AsyncWatch[WatchEvent | WatchProgress]] = (
            weakref.WeakSet()
        )
        self._closed = False

    @property
    def target(self) -> str:
        """The ``host:port`` the client talks to."""
        return self._target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._target!r})"

    async def __aenter__(self) -> Self:
        self._stub()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's watches and its channel. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        for watch in builtins.list(self._watches):
            await watch.aclose()
        if self._channel is not None:
            await self._channel.close(None)

    def _stub(self) -> KeyValueAsyncStub:
        if self._closed:
            raise KvError("the client is closed")
        if self._stub_ is None:
            if self._tls is None:
                self._channel = grpc.aio.insecure_channel(self._target, self._options)
            else:
                credentials = _p.channel_credentials(self._tls)
                self._channel = grpc.aio.secure_channel(self._target, credentials, self._options)
            self._stub_ = kv_pb2_grpc.KeyValueStub(self._channel)
        return self._stub_

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        timeout: _p.Timeout,  # noqa: ASYNC109
        idempotent: bool,
    ) -> _Resp:
        deadline = _p.Deadline(_p.resolve_timeout(timeout, self._timeout))
        attempt = 0
        while True:
            try:
                return await method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = _p.retry_delay(
                    _p.rpc_code(error),
                    idempotent=idempotent,
                    attempt=attempt,
                    policy=self._retry,
                    deadline=deadline,
                )
                if delay is None:
                    raise _p.error_from_rpc(error) from error
            await asyncio.sleep(delay)
            attempt += 1

    async def put(
        self,
        key: str,
        value: _p.Value,
        *,
        ttl: _p.Ttl = None,
        if_absent: bool = False,
        if_present: bool = False,
        if_mod_revision: int | None = None,
        if_version: int | None = None,
        return_previous: bool = False,
        content_type: str | None = None,
        timeout: _p.Timeout = _p.DEFAULT,  # noqa: ASYNC109
    ) -> PutResult:
        """Create or replace ``key`` and return a PutResult.

        ``value`` is ``str`` (stored as its UTF-8 bytes) or bytes (stored unchanged). ``ttl`` is
        the time to live in seconds (a float with millisecond precision, or a timedelta),
        counted from when the server accepts the put; ``None`` means the key never expires.

        Conditions, checked together with the write (if one fails, :class:`Conflict` is raised
        and nothing changes): ``if_absent`` creates only; ``if_present`` updates only;
        ``if_mod_revision`` / ``if_version`` compare-and-set (the key must exist with that
        mod_revision / version). ``if_absent`` cannot be combined with the other three.
        ``return_previous`` asks for ``prev_entry``, the key as it was before. ``content_type`` is
        the media type kept with the value (e.g. ``"application/json"``).

        ``timeout`` is in seconds (``None``: no limit; default: the client's). A put is retried
        on UNAVAILABLE only when it is conditional on ``if_mod_revision`` or ``if_version``.
        """
        request, data = _p.put_request(
            key,
            value,
            ttl=ttl,
            if_absent=if_absent,
            if_present=if_present,
            if_mod_revision=if_mod_revision,
            if_version=if_version,
            return_previous=return_previous,
            content_type=content_type,
        )
        response = await self._call(
            self._stub().Put, request, timeout=timeout, idempotent=_p.put_is_idempotent(request)
        )
        return _p.put_result(response, data)

    async def put_many(
        self,
        items: Iterable[_p.PutManyItem],
        *,
        batch_size: int = _p.MAX_BATCH_PUTS,
        timeout: _p.Timeout = _p.DEFAULT,  # noqa: ASYNC109
    ) -> PutManyResult:
        """Apply many puts in order and return a PutManyResult, one PutOutcome per item.

        ``items`` are :class:`PutItem` values (the arguments of ``put`` for one key) or
        ``(key, value)`` pairs. They are sent with BatchPut, at most ``batch_size`` puts per
        call (default and maximum 1000), one call after the other. Each put is applied on its
        own, like ``put``, with its own revision; the puts are not atomic as a group: a put
        whose condition fails gets :class:`Conflict` as its ``error`` and the others are still
        applied. The call returns once every applied put is durable.

        An invalid item (an empty key, a negative TTL, a value over the server's limit, ...)
        raises :class:`InvalidArgument` naming it (``items[3]``, or the server's
        ``puts[3].key``) and its call writes nothing; an error of a whole call (e.g.
        :class:`Unavailable`) is raised, and the calls before it were applied.

        ``timeout`` applies to each call. A call is retried on UNAVAILABLE only when every put
        of it is conditional on ``if_mod_revision`` or ``if_version``.
        """
        batch = _p.PutMany(items, batch_size)
        for request, values in batch.calls:
            idempotent = _p.batch_put_is_idempotent(request)
            response = await self._call(
                self._stub().BatchPut, request, timeout=timeout, idempotent=idempotent
            )
            batch.add(request, values, response)
        return batch.result()

    async def get(self, key: str, *, timeout: _p.Timeout = _p.DEFAULT) -> Entry:  # noqa: ASYNC109
        """Return the Entry of ``key``; raise :class:`KeyNotFound` when it does not exist.

        A key whose TTL has passed does not exist. ``entry.value`` is bytes, ``entry.text``
        the value decoded as UTF-8. Retried on UNAVAILABLE.
        """
        response = await self._call(self._stub().Get, _p.get_request(key), timeout=timeout, idempotent=True)
        return _p.get_result(response)

    async def delete(
        self,
        key: str,
        *,
        prefix: bool = False,
        allow_missing: bool = False,
        if_mod_revision: int | None = None,
        if_version: int | None = None,
        return_previous: bool = False,
        timeout: _p.Timeout = _p.DEFAULT,  # noqa: ASYNC109
    ) -> DeleteResult:
        """Delete ``key``, or with ``prefix=True`` every key that starts with it, and return a
        DeleteResult (``deleted`` counts the keys removed).

        An absent key raises :class:`KeyNotFound` unless ``allow_missing`` is set; a prefix that
        matches nothing deletes nothing. ``if_mod_revision`` / ``if_version`` delete only if the
        key exists with that mod_revision / version (else :class:`Conflict`; not with
        ``prefix``). ``return_previous`` fills ``prev_entries`` with the removed keys and their
        values. A delete is retried on UNAVAILABLE only when it is conditional on
        ``if_mod_revision`` or ``if_version``.
        """
        request = _p.delete_request(
            key,
            prefix=prefix,
            allow_missing=allow_missing,
            if_mod_revision=if_mod_revision,
            if_version=if_version,
            return_previous=return_previous,
        )
        response = await self._call(
            self._stub().Delete,
            request,
            timeout=timeout,
            idempotent=_p.delete_is_idempotent(request),
        )
        return _p.delete_result(response)

    async def list(
        self,
        prefix: str = "",
        *,
        start_key: str = "",
        end_key: str = "",
        keys_only: bool = False,
        limit: int | None = None,
        page_size: int | None = None,
        include_count: bool = False,
        timeout: _p.Timeout = _p.DEFAULT,  # noqa: ASYNC109
    ) -> ListResult:
        """List the keys under ``prefix`` (or in ``[start_key, end_key)``; everything by
        default) in key byte order, walking all pages, and return a ListResult.

        Every page is read at the same snapshot, whose revision is ``result.revision``; if the
        snapshot expires during the walk (OUT_OF_RANGE), the listing starts over at a newer one.
        ``keys_only`` leaves the values out, ``limit`` stops after that many entries,
        ``page_size`` is the number of keys per call (default: the server's), ``include_count``
        fills ``result.count`` with the size of the whole range. ``timeout`` applies to each
        page; pages are retried on UNAVAILABLE.
        """
        walk = _p.ListWalk(
            _p.list_request(
                prefix,
                start_key=start_key,
                end_key=end_key,
                page_size=page_size,
                keys_only=keys_only,
                include_count=include_count,
            ),
            limit,
        )
        while (request := walk.next_request()) is not None:
            try:
                response = await self._call(self._stub().List, request, timeout=timeout, idempotent=True)
            except HistoryCompacted as error:
                walk.restart(error)
                continue
            walk.add(response)
        return walk.result()

    async def status(self, *, timeout: _p.Timeout = _p.DEFAULT) -> ServerStatus:  # noqa: ASYNC109
        """Return the server's ServerStatus: revision, version, store, key count and limits.

        Retried on UNAVAILABLE.
        """
        response = await self._call(
            self._stub().Status, kv_pb2.StatusRequest(), timeout=timeout, idempotent=True
        )
        return _p.status_result(response)

    async def limits(self, *, timeout: _p.Timeout = _p.DEFAULT) -> Limits:  # noqa: ASYNC109
        """Return the server's Limits (key and value sizes, page sizes, progress interval)."""
        return (await self.status(timeout=timeout)).limits

    @overload
    def watch(
        self,
        key: str = "",
        *,
        prefix: bool = False,
        start_revision: int | None = None,
        include_initial_state: bool = False,
        include_previous: bool = False,
        progress_interval: float | None = None,
        progress: Literal[False] = False,
    ) -> AsyncWatch[WatchEvent]: ...

    @overload
    def watch(
        self,
        key: str = "",
        *,
        prefix: bool = False,
        start_revision: int | None = None,
        include_initial_state: bool = False,
        include_previous: bool = False,
        progress_interval: float | None = None,
        progress: Literal[True],
    ) -> AsyncWatch[WatchEvent | WatchProgress]: ...

    def watch(
        self,
        key: str = "",
        *,
        prefix: bool = False,
        start_revision: int | None = None,
        include_initial_state: bool = False,
        include_previous: bool = False,
        progress_interval: float | None = None,
        progress: bool = False,
    ) -> AsyncWatch[WatchEvent] | AsyncWatch[WatchEvent | WatchProgress]:
        """Watch ``key``, or with ``prefix=True`` every key that starts with it (an empty
        prefix watches every key), and return a watch to iterate for WatchEvents.

        ``start_revision`` is the first revision to deliver (default: changes after the current
        revision). ``include_initial_state`` first delivers the current entries as PUT events
        with ``initial=True``, in key order (not with ``start_revision``). ``include_previous``
        fills ``prev_entry``. ``progress_interval`` asks the server for a progress message
        every so many seconds while no event arrives; with ``progress=True`` those are also
        yielded as WatchProgress items. ``watch.revision`` is always the revision up to which
        every matching event has been delivered.

        The watch resumes by itself from the last delivered revision when the connection drops,
        the server restarts or cancels the stream to shut down or for a slow consumer, without
        losing or repeating an event; it gives up after ``RetryPolicy.watch_resume_timeout``
        seconds without a message. It raises :class:`HistoryCompacted` (with
        ``compact_revision``) when the history it needs is gone: list again and watch from the
        listing's revision + 1. Nothing is sent before the first iteration, which raises the
        error (e.g. :class:`Unavailable`) when the server cannot be reached at all. Close the
        watch (or use it as a context manager) to stop it.
        """
        options = _p.watch_options(
            key,
            prefix=prefix,
            start_revision=start_revision,
            include_initial_state=include_initial_state,
            include_previous=include_previous,
            progress_interval=progress_interval,
            progress=progress,
        )
        if self._closed:
            raise KvError("the client is closed")
        if progress:
            watch_p: AsyncWatch[WatchEvent | WatchProgress] = AsyncWatch(self, options)
            self._watches.add(watch_p)
            return watch_p
        watch: AsyncWatch[WatchEvent] = AsyncWatch(self, options)
        self._watches.add(watch)
        return watch


class AsyncWatch(Generic[_Item]):
    """A running watch, made by :meth:`AsyncClient.watch`: an async iterator of events.

    ``revision`` is the revision up to which every matching event has been delivered.
    """

    def __init__(self, client: AsyncClient, options: _p.WatchOptions) -> None:
        self._client = client
        self._tracker = _p.WatchTracker(options, client._retry)
        self._call: grpc.aio.UnaryStreamCall[kv_pb2.WatchRequest, kv_pb2.WatchResponse] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    @property
    def revision(self) -> int:
        """Every matching event up to this revision has been delivered (0 before any news)."""
        return self._tracker.revision

    @property
    def closed(self) -> bool:
        """True once the watch is closed (by ``aclose``, or by an error it raised)."""
        return self._closed

    def __repr__(self) -> str:
        o = self._tracker.options
        return f"AsyncWatch(key={o.key!r}, prefix={o.prefix}, revision={self.revision})"

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def close(self) -> None:
        """Stop the watch: a pending iteration (in any task) ends. Closing twice is fine."""
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        self._drop()

    async def aclose(self) -> None:
        """Stop the watch (the coroutine form of ``close``)."""
        self.close()

    async def __anext__(self) -> _Item:
        try:
            while True:
                item = self._tracker.pop()
                if item is not None:
                    return item  # type: ignore[return-value]
                if self._closed:
                    raise StopAsyncIteration
                await self._step()
        except StopAsyncIteration:
            raise
        except BaseException:
            self.close()
            raise

    def _drop(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def _sleep(self, delay: float) -> None:
        if delay <= 0 or self._closed:
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _connect(self) -> grpc.aio.UnaryStreamCall[kv_pb2.WatchRequest, kv_pb2.WatchResponse] | None:
        tracker = self._tracker
        if tracker.needs_status:
            tracker.on_status((await self._client.status()).revision)
        if self._closed:
            return None
        self._call = self._client._stub().Watch(tracker.request(), metadata=self._client._metadata)
        return self._call

    async def _step(self) -> None:
        tracker = self._tracker
        call = self._call or await self._connect()
        if call is None:
            return
        try:
            message = await call.read()
        except asyncio.CancelledError:
            if not self._closed:
                raise  # the task is cancelled, not the watch
            return
        except grpc.RpcError as error:
            self._drop()
            if not self._closed:
                await self._sleep(tracker.on_error(error))
            return
        if not isinstance(message, kv_pb2.WatchResponse):  # grpc.aio.EOF: the stream ended
            self._drop()
            if not self._closed:
                await self._sleep(tracker.on_end())
            return
        tracker.on_message(message)
        if tracker.reconnect:
            self._drop()
            await self._sleep(tracker.on_end())
