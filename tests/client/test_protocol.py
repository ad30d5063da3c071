"""Unit tests of kvclient's I/O-free core: requests, conversions, errors, retries, watch state."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta

import grpc
import pytest

import kvclient
from kv.v1 import kv_pb2
from kvclient import _protocol as p
from kvclient.errors import ERROR_TABLE, error_for_status


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- API shape


PUBLIC_METHODS = ["put", "get", "delete", "list", "watch", "status", "limits", "close"]


@pytest.mark.parametrize("name", PUBLIC_METHODS)
def test_sync_and_async_clients_have_the_same_methods_docstrings_and_parameters(name: str) -> None:
    sync_method = getattr(kvclient.Client, name)
    async_method = getattr(kvclient.AsyncClient, name)
    assert sync_method.__doc__
    assert sync_method.__doc__ == async_method.__doc__
    sync_parameters = inspect.signature(sync_method).parameters
    assert sync_parameters == inspect.signature(async_method).parameters
    is_coroutine = inspect.iscoroutinefunction(async_method)
    assert is_coroutine == (name != "watch")


def test_public_names_are_exported() -> None:
    for name in kvclient.__all__:
        assert hasattr(kvclient, name), name


def test_results_are_frozen_dataclasses() -> None:
    entry = kvclient.Entry("k", b"v", 1, 1, 1)
    with pytest.raises(AttributeError):
        entry.value = b"x"  # type: ignore[misc]
    assert entry.text == "v"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("code", "cls"), list(ERROR_TABLE.items()))
def test_every_status_code_maps_to_its_exception_and_keeps_the_message(
    code: grpc.StatusCode, cls: type[kvclient.KvError]
) -> None:
    error = p.error_from_rpc(FakeRpcError(code, "server says: field `key` is too long"))
    assert type(error) is cls
    assert str(error) == "server says: field `key` is too long"
    assert error.code == code


def test_the_error_table_covers_the_contract() -> None:
    expected = {
        grpc.StatusCode.NOT_FOUND: kvclient.KeyNotFound,
        grpc.StatusCode.ABORTED: kvclient.Conflict,
        grpc.StatusCode.INVALID_ARGUMENT: kvclient.InvalidArgument,
        grpc.StatusCode.OUT_OF_RANGE: kvclient.HistoryCompacted,
        grpc.StatusCode.RESOURCE_EXHAUSTED: kvclient.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: kvclient.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: kvclient.DeadlineExceeded,
        grpc.StatusCode.PERMISSION_DENIED: kvclient.PermissionDenied,
        grpc.StatusCode.UNAUTHENTICATED: kvclient.Unauthenticated,
    }
    for code, cls in expected.items():
        assert ERROR_TABLE[code] is cls
    assert set(ERROR_TABLE) | {grpc.StatusCode.OK} == set(grpc.StatusCode)


def test_errors_have_useful_bases_and_defaults() -> None:
    assert isinstance(kvclient.KeyNotFound(), LookupError)
    assert isinstance(kvclient.InvalidArgument(), ValueError)
    assert issubclass(kvclient.SlowConsumer, kvclient.ResourceExhausted)
    assert str(error_for_status(grpc.StatusCode.NOT_FOUND, "")) == "key not found"
    compacted = kvclient.HistoryCompacted("gone", compact_revision=7)
    assert compacted.compact_revision == 7


# --------------------------------------------------------------------------- requests


def test_put_request_encodes_str_as_utf8_and_passes_bytes_through() -> None:
    request, data = p.put_request(
        "k", "héllo", ttl=None, if_absent=False, if_present=False, if_mod_revision=None,
        if_version=None, return_previous=False,
    )  # fmt: skip
    assert data == "héllo".encode()
    assert request.WhichOneof("content") == "value"
    request, data = p.put_request(
        "k", b"\x00\xff", ttl=1.5, if_absent=True, if_present=False, if_mod_revision=None,
        if_version=None, return_previous=True,
    )  # fmt: skip
    assert data == b"\x00\xff"
    assert request.value_bytes == b"\x00\xff"
    assert request.ttl_ms == 1500
    assert request.if_absent
    assert request.return_previous
    request, data = p.put_request(
        "k", "", ttl=None, if_absent=False, if_present=False, if_mod_revision=None,
        if_version=None, return_previous=False,
    )  # fmt: skip
    assert data == b""
    assert request.WhichOneof("content") is None


@pytest.mark.parametrize(
    ("ttl", "ms"),
    [(None, 0), (0, 0), (1.5, 1500), (0.0004, 1), (0.0016, 2), (timedelta(minutes=2), 120000), (3, 3000)],
)
def test_ttl_has_millisecond_precision(ttl: p.Ttl, ms: int) -> None:
    assert p.ttl_to_ms(ttl) == ms


@pytest.mark.parametrize("ttl", [-1, float("nan"), float("inf")])
def test_bad_ttls_are_invalid_arguments(ttl: float) -> None:
    with pytest.raises(kvclient.InvalidArgument):
        p.ttl_to_ms(ttl)


def test_bad_values_and_keys_are_rejected_before_sending() -> None:
    with pytest.raises(TypeError):
        p.encode_value(42)  # type: ignore[arg-type]
    with pytest.raises(kvclient.InvalidArgument):
        p.get_request("")
    with pytest.raises(kvclient.InvalidArgument):
        p.delete_request(
            "k", prefix=False, allow_missing=False, if_mod_revision=0, if_version=None, return_previous=False
        )
    # An empty key is fine with prefix (every key).
    assert p.delete_request(
        "", prefix=True, allow_missing=False, if_mod_revision=None, if_version=None, return_previous=False
    ).prefix


def test_only_writes_conditional_on_a_revision_are_idempotent() -> None:
    def put(**kw: object) -> kv_pb2.PutRequest:
        args: dict[str, object] = dict(
            ttl=None, if_absent=False, if_present=False, if_mod_revision=None, if_version=None,
            return_previous=False,
        )  # fmt: skip
        args.update(kw)
        return p.put_request("k", "v", **args)[0]  # type: ignore[arg-type]

    assert not p.put_is_idempotent(put())
    assert not p.put_is_idempotent(put(if_absent=True))
    assert not p.put_is_idempotent(put(if_present=True))
    assert p.put_is_idempotent(put(if_mod_revision=3))
    assert p.put_is_idempotent(put(if_version=2))
    assert p.delete_is_idempotent(kv_pb2.DeleteRequest(key="k", if_version=1))
    assert not p.delete_is_idempotent(kv_pb2.DeleteRequest(key="k", allow_missing=True))


def test_call_metadata_carries_a_bearer_token() -> None:
    assert p.call_metadata(None) == ()
    assert p.call_metadata("abc") == (("authorization", "Bearer abc"),)
    with pytest.raises(kvclient.InvalidArgument):
        p.call_metadata("a\nb")


def test_timeouts_resolve_to_the_call_or_client_default() -> None:
    assert p.resolve_timeout(p.DEFAULT, 10.0) == 10.0
    assert p.resolve_timeout(2.5, 10.0) == 2.5
    assert p.resolve_timeout(None, 10.0) is None
    with pytest.raises(kvclient.InvalidArgument):
        p.resolve_timeout(0, 10.0)


# --------------------------------------------------------------------------- responses


def test_entries_convert_text_bytes_empty_and_expiry() -> None:
    pb = kv_pb2.Entry(key="k", value="hé", create_revision=2, mod_revision=5, version=3)
    pb.expire_time.FromMilliseconds(1_700_000_000_250)
    entry = p.entry_from_pb(pb)
    assert entry.value == "hé".encode()
    assert entry.text == "hé"
    assert (entry.create_revision, entry.mod_revision, entry.version) == (2, 5, 3)
    assert entry.expires_at == datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC)
    assert p.entry_from_pb(kv_pb2.Entry(key="b", value_bytes=b"\xff")).value == b"\xff"
    empty = p.entry_from_pb(kv_pb2.Entry(key="e"))
    assert empty.value == b""
    assert empty.expires_at is None
    assert empty.ttl() is None


def test_put_result_reports_the_written_value() -> None:
    response = kv_pb2.PutResponse(
        header=kv_pb2.ResponseHeader(revision=9),
        created=True,
        entry=kv_pb2.Entry(key="k", create_revision=9, mod_revision=9, version=1),
    )
    result = p.put_result(response, b"v")
    assert result.entry.value == b"v"
    assert result.revision == 9
    assert result.created
    assert result.prev_entry is None


def _page(rev: int, keys: list[str], token: str = "", count: int = 0) -> kv_pb2.ListResponse:
    return kv_pb2.ListResponse(
        header=kv_pb2.ResponseHeader(revision=rev),
        entries=[kv_pb2.Entry(key=k, mod_revision=1) for k in keys],
        next_page_token=token,
        count=count,
    )


def test_list_walk_keeps_the_fields_and_the_first_snapshot_revision() -> None:
    walk = p.ListWalk(
        p.list_request("a/", start_key="", end_key="", page_size=2, keys_only=True, include_count=True),
        None,
    )
    first = walk.next_request()
    assert first is not None
    assert first.page_token == ""
    walk.add(_page(7, ["a/1", "a/2"], "t1", count=3))
    second = walk.next_request()
    assert second is not None
    assert (second.page_token, second.prefix, second.page_size, second.keys_only) == ("t1", "a/", 2, True)
    walk.add(_page(7, ["a/3"]))
    assert walk.next_request() is None
    result = walk.result()
    assert result.keys() == ["a/1", "a/2", "a/3"]
    assert (result.revision, result.count, result.truncated) == (7, 3, False)


def test_list_walk_limit_and_restart() -> None:
    walk = p.ListWalk(p.list_request("", start_key="", end_key="", page_size=None, keys_only=False,
                                     include_count=False), 3)  # fmt: skip
    walk.add(_page(4, ["a", "b"], "t"))
    walk.restart(kvclient.HistoryCompacted("token expired"))  # starts over
    assert walk.next_request() is not None
    walk.add(_page(5, ["a", "b"], "t"))
    walk.add(_page(5, ["c", "d"], "t2"))
    assert walk.next_request() is None
    result = walk.result()
    assert result.keys() == ["a", "b", "c"]
    assert result.truncated
    assert result.revision == 5


# --------------------------------------------------------------------------- retries


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = kvclient.RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    assert p.backoff(policy, 0, rand=lambda: 0.0) == pytest.approx(0.05)
    assert p.backoff(policy, 0, rand=lambda: 1.0) == pytest.approx(0.1)
    assert p.backoff(policy, 2, rand=lambda: 1.0) == pytest.approx(0.4)
    assert p.backoff(policy, 30, rand=lambda: 1.0) == pytest.approx(1.0)
    assert p.backoff(policy, 1000, rand=lambda: 0.5) <= 1.0


def test_retry_rule() -> None:
    policy = kvclient.RetryPolicy(max_attempts=3)
    deadline = p.Deadline(10.0)
    unavailable = grpc.StatusCode.UNAVAILABLE

    def delay(code: grpc.StatusCode, idempotent: bool, attempt: int = 0) -> float | None:
        return p.retry_delay(code, idempotent=idempotent, attempt=attempt, policy=policy, deadline=deadline)

    assert delay(unavailable, True) is not None
    assert delay(unavailable, False) is None  # an unconditional write: never
    assert delay(grpc.StatusCode.CANCELLED, True) is not None  # only a server cancels a unary call
    assert delay(grpc.StatusCode.CANCELLED, False) is None
    assert delay(grpc.StatusCode.DEADLINE_EXCEEDED, True) is None
    assert delay(grpc.StatusCode.ABORTED, True) is None
    assert delay(unavailable, True, attempt=1) is not None
    assert delay(unavailable, True, attempt=2) is None  # max_attempts reached
    clock = Clock()
    short = p.Deadline(0.01, clock=clock)
    assert p.retry_delay(unavailable, idempotent=True, attempt=0, policy=policy, deadline=short) is None


# --------------------------------------------------------------------------- watch


def _watch_options(**kw: object) -> p.WatchOptions:
    args: dict[str, object] = dict(
        prefix=True, start_revision=None, include_initial_state=False, include_previous=False,
        progress_interval=None, progress=False,
    )  # fmt: skip
    args.update(kw)
    return p.watch_options("app/", **args)  # type: ignore[arg-type]


def _put_event(rev: int, key: str = "app/k") -> kv_pb2.Event:
    return kv_pb2.Event(
        type=kv_pb2.Event.TYPE_PUT,
        entry=kv_pb2.Entry(key=key, value=f"v{rev}", mod_revision=rev, create_revision=1, version=rev),
    )


def _events(header: int, *revs: int) -> kv_pb2.WatchResponse:
    return kv_pb2.WatchResponse(
        header=kv_pb2.ResponseHeader(revision=header), events=[_put_event(r) for r in revs]
    )


def _drain(tracker: p.WatchTracker) -> list[p.WatchItem]:
    items = []
    while (item := tracker.pop()) is not None:
        items.append(item)
    return items


def _tracker(clock: Clock | None = None, **kw: object) -> p.WatchTracker:
    policy = kvclient.RetryPolicy(watch_resume_timeout=5.0)
    return p.WatchTracker(_watch_options(**kw), policy, clock=clock or Clock(), rand=lambda: 0.5)


def test_a_watch_from_now_starts_after_the_status_revision() -> None:
    tracker = _tracker()
    assert tracker.needs_status
    tracker.on_status(41)
    assert not tracker.needs_status
    assert tracker.request().start_revision == 42
    assert tracker.revision == 41


def test_watch_resumes_after_the_last_event_and_drops_repeats() -> None:
    tracker = _tracker(start_revision=5)
    tracker.on_status(3)
    assert tracker.request().start_revision == 5
    tracker.on_message(_events(6, 5, 6))
    assert [i.revision for i in _drain(tracker)] == [5, 6]
    assert tracker.revision == 6
    assert tracker.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "socket closed")) == 0.0
    assert tracker.request().start_revision == 7
    tracker.on_message(_events(8, 6, 7, 8))  # a server repeating 6 is tolerated
    assert [i.revision for i in _drain(tracker)] == [7, 8]


def test_progress_messages_advance_the_revision_and_yield_only_when_asked() -> None:
    quiet = _tracker(start_revision=1)
    quiet.on_message(kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=12)))
    assert _drain(quiet) == []
    assert quiet.revision == 12
    assert quiet.request().start_revision == 13
    loud = _tracker(start_revision=1, progress=True)
    loud.on_message(kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=12)))
    assert _drain(loud) == [kvclient.WatchProgress(12)]


@pytest.mark.parametrize(
    ("reason", "error"),
    [
        (kv_pb2.WatchCancel.REASON_SHUTDOWN, kvclient.Unavailable),
        (kv_pb2.WatchCancel.REASON_SLOW_CONSUMER, kvclient.SlowConsumer),
    ],
)
def test_cancel_for_shutdown_or_slow_consumer_resumes_from_resume_revision(
    reason: int, error: type[kvclient.KvError]
) -> None:
    clock = Clock()
    tracker = _tracker(clock, start_revision=3)
    tracker.on_message(_events(4, 3, 4))
    _drain(tracker)
    cancel = kv_pb2.WatchCancel(reason=reason, resume_revision=5, message="bye")  # type: ignore[arg-type]
    tracker.on_message(kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=4), cancel=cancel))
    assert tracker.reconnect
    assert tracker.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE)) == 0.0
    assert tracker.request().start_revision == 5
    assert not tracker.reconnect
    # Cancelled again and again without progress: backoff, then after watch_resume_timeout it
    # gives up with the cancel's error.
    tracker.on_message(kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=4), cancel=cancel))
    assert tracker.on_end() > 0
    tracker.request()
    clock.now += 6
    tracker.on_message(kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=4), cancel=cancel))
    with pytest.raises(error, match="bye"):
        tracker.on_end()


def test_compacted_history_raises_with_compact_revision() -> None:
    tracker = _tracker(start_revision=2)
    cancel = kv_pb2.WatchCancel(
        reason=kv_pb2.WatchCancel.REASON_COMPACTED, compact_revision=10, message="old"
    )
    with pytest.raises(kvclient.HistoryCompacted) as info:
        tracker.on_message(kv_pb2.WatchResponse(cancel=cancel))
    assert info.value.compact_revision == 10
    assert str(info.value) == "old"
    with pytest.raises(kvclient.HistoryCompacted):
        tracker.on_error(FakeRpcError(grpc.StatusCode.OUT_OF_RANGE, "revision 2 is compacted"))


def test_non_resumable_errors_raise_at_once() -> None:
    tracker = _tracker(start_revision=2)
    with pytest.raises(kvclient.InvalidArgument, match="key"):
        tracker.on_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "key: bad"))
    with pytest.raises(kvclient.PermissionDenied):
        tracker.on_error(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED))


def test_the_initial_state_is_delivered_whole_exactly_once() -> None:
    tracker = _tracker(include_initial_state=True, progress=True)
    tracker.on_status(3)
    assert tracker.request().include_initial_state
    head = kv_pb2.ResponseHeader(revision=3)
    tracker.on_message(kv_pb2.WatchResponse(header=head, initial_entries=[kv_pb2.Entry(key="app/a")]))
    assert _drain(tracker) == []  # buffered until complete
    tracker.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    request = tracker.request()
    assert request.include_initial_state  # broken before completion: fetched again
    assert request.start_revision == 0
    head = kv_pb2.ResponseHeader(revision=4)
    tracker.on_message(kv_pb2.WatchResponse(header=head, initial_entries=[kv_pb2.Entry(key="app/a")]))
    tracker.on_message(
        kv_pb2.WatchResponse(
            header=head, initial_entries=[kv_pb2.Entry(key="app/b")], initial_state_complete=True
        )
    )
    items = _drain(tracker)
    assert [(i.key, i.initial) for i in items[:2]] == [("app/a", True), ("app/b", True)]  # type: ignore[union-attr]
    assert items[2] == kvclient.WatchProgress(4)
    tracker.on_message(_events(5, 5))
    assert [i.revision for i in _drain(tracker)] == [5]
    tracker.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    request = tracker.request()
    assert not request.include_initial_state
    assert request.start_revision == 6


def test_watch_option_rules() -> None:
    with pytest.raises(kvclient.InvalidArgument):
        _watch_options(start_revision=3, include_initial_state=True)
    with pytest.raises(kvclient.InvalidArgument):
        p.watch_options(
            "", prefix=False, start_revision=None, include_initial_state=False, include_previous=False,
            progress_interval=None, progress=False,
        )  # fmt: skip
    assert _watch_options(progress_interval=0.25).progress_interval_ms == 250
    assert _watch_options(start_revision=0).start_revision is None


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("grpc://kv.example:50051", "kv.example:50051"),
        ("127.0.0.1:50051,127.0.0.1:50052", "ipv4:127.0.0.1:50051,127.0.0.1:50052"),
        (["127.0.0.1:1", " 127.0.0.2:2 "], "ipv4:127.0.0.1:1,127.0.0.2:2"),
        (["[::1]:1", "[::1]:2"], "ipv6:[::1]:1,[::1]:2"),
        (["localhost:7"], "localhost:7"),
    ],
)
def test_targets_one_or_several(given: str | list[str], target: str) -> None:
    assert p.normalize_target(given) == target


def test_several_targets_share_one_round_robin_channel() -> None:
    options = dict(p.channel_options(None, (), "ipv4:127.0.0.1:1,127.0.0.1:2"))
    assert '"round_robin"' in options["grpc.service_config"]
    assert options["grpc.default_authority"] == "127.0.0.1:1"
    assert "grpc.service_config" not in dict(p.channel_options(None, (), "127.0.0.1:1"))


@pytest.mark.parametrize("given", ["", [], "127.0.0.1:1,[::1]:2", "127.0.0.1:x,127.0.0.1:2"])
def test_bad_targets_are_invalid_arguments(given: str | list[str]) -> None:
    with pytest.raises(kvclient.InvalidArgument):
        p.normalize_target(given)
