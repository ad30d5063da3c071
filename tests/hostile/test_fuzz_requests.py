"""Thousands of fuzzed and malformed requests against a real kv-server process.

Every method of kv.v1.KeyValue and kv.compat.v1.CompatService gets raw bytes: random ones, and
valid encodings mutated on the wire (truncated, bytes flipped or inserted, wrong wire types, huge
varints and lengths, out-of-range numbers, repeated and unknown fields, deeply nested groups,
invalid UTF-8). Each answer must be OK or one of the documented statuses, never UNKNOWN or
INTERNAL; the server must stay up and healthy, and log no unexpected failure.

What the requests changed is accounted for exactly: the whole history after the fuzzing starts is
replayed with Watch, and every event must come from a request that succeeded (its PUTs, the keys
its DELETEs reported, EXPIREs of keys written with a TTL). A rejected request that changed
anything would leave an event nobody accounts for. Sentinel keys written before the fuzzing, under
a prefix the fuzzed requests are kept from addressing, must be exactly as they were.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kv.compat.v1 import compat_pb2
from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import ServerProcess

UNARY_TIMEOUT_S = 10.0
# An accepted Watch streams until the client leaves: it is given this long, then the deadline ends it.
WATCH_WINDOW_S = 0.1
MIN_REQUESTS = 2000
BATCH = 30
EXAMPLES = 75  # 75 x 30 fuzzed requests, plus the fixed corpus

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

SENTINEL_PREFIX = "~sentinel/"
SENTINELS = {f"{SENTINEL_PREFIX}{index}": f"sentinel value {index}" for index in range(5)}

KV = "/kv.v1.KeyValue/"
COMPAT = "/kv.compat.v1.CompatService/"
REQUEST_TYPES: dict[str, type[Message]] = {
    f"{KV}Get": kv_pb2.GetRequest,
    f"{KV}GetValue": kv_pb2.GetValueRequest,
    f"{KV}Put": kv_pb2.PutRequest,
    f"{KV}PutValue": kv_pb2.PutValueRequest,
    f"{KV}Delete": kv_pb2.DeleteRequest,
    f"{KV}List": kv_pb2.ListRequest,
    f"{KV}Watch": kv_pb2.WatchRequest,
    f"{KV}Status": kv_pb2.StatusRequest,
    f"{COMPAT}Set": compat_pb2.SetRequest,
    f"{COMPAT}PutKey": compat_pb2.PutKeyRequest,
    f"{COMPAT}Get": compat_pb2.GetRequest,
    f"{COMPAT}LocalRead": compat_pb2.LocalReadRequest,
    f"{COMPAT}Delete": compat_pb2.DeleteRequest,
    f"{COMPAT}All": compat_pb2.AllRequest,
    f"{COMPAT}Health": compat_pb2.HealthRequest,
}
METHODS = sorted(REQUEST_TYPES)
PUT_METHODS = {f"{KV}Put", f"{KV}PutValue", f"{COMPAT}Set", f"{COMPAT}PutKey"}

# Wire format.

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


def varint(value: int) -> bytes:
    value &= (1 << 70) - 1  # negative numbers as protobuf sends them (two's complement), and beyond
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, data: bytes) -> bytes:
    return tag(number, LEN) + varint(len(data)) + data


def nested_groups(number: int, depth: int) -> bytes:
    return tag(number, SGROUP) * depth + tag(number, EGROUP) * depth


def nested_messages(number: int, depth: int) -> bytes:
    data = b""
    for _ in range(depth):
        data = length_delimited(number, data)
    return data


# Valid requests, as hypothesis builds them.

INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2, 7, 2**31 - 1, 2**31, 2**53, 10**15, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 1000, 1001, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)
KEYS = st.one_of(
    st.sampled_from(["a", "a/b", "k", "", " ", "\x00", "é", "🔑", "~", "x" * 4096, "x" * 4097]),
    st.text(max_size=12),
)
# One value in twenty is large: at the limit (1 MiB), just over it, or over gRPC's message limit.
LARGE_VALUES = st.sampled_from([1 << 20, (1 << 20) + 1, 3 << 20]).map(lambda size: b"v" * size)
VALUES = st.integers(0, 19).flatmap(lambda dice: LARGE_VALUES if dice == 0 else st.binary(max_size=48))
CONTENT_TYPES = st.one_of(
    st.sampled_from(["", "text/plain", "application/json", "x" * 300]), st.text(max_size=8)
)
BODIES = st.builds(httpbody_pb2.HttpBody, content_type=CONTENT_TYPES, data=VALUES)


def put_requests() -> st.SearchStrategy[Message]:
    def build(value: bytes, as_text: bool, **fields: Any) -> kv_pb2.PutRequest:
        request = kv_pb2.PutRequest(**fields)
        text = value.decode(errors="replace")
        if as_text:
            request.value = text
        else:
            request.value_bytes = value
        return request

    return st.builds(
        build,
        value=VALUES,
        as_text=st.booleans(),
        key=KEYS,
        ttl_ms=INT64,
        if_absent=st.booleans(),
        if_present=st.booleans(),
        if_mod_revision=INT64,
        if_version=INT64,
        return_previous=st.booleans(),
        content_type=CONTENT_TYPES,
    )


def list_requests(page_tokens: list[str]) -> st.SearchStrategy[Message]:
    tokens = st.one_of(st.sampled_from(["", *page_tokens]), st.text(max_size=40))
    return st.builds(
        kv_pb2.ListRequest,
        prefix=KEYS,
        start_key=KEYS,
        end_key=KEYS,
        page_size=INT32,
        page_token=tokens,
        keys_only=st.booleans(),
        include_count=st.booleans(),
    )


def valid_requests(method: str, page_tokens: list[str]) -> st.SearchStrategy[Message]:
    name = method.rsplit("/", 1)[1]
    if method.startswith(KV):
        strategies: dict[str, st.SearchStrategy[Message]] = {
            "Get": st.builds(kv_pb2.GetRequest, key=KEYS),
            "GetValue": st.builds(kv_pb2.GetValueRequest, key=KEYS),
            "Put": put_requests(),
            "PutValue": st.builds(
                kv_pb2.PutValueRequest,
                key=KEYS,
                body=BODIES,
                ttl_ms=INT64,
                if_absent=st.booleans(),
                if_present=st.booleans(),
                if_mod_revision=INT64,
                if_version=INT64,
            ),
            "Delete": st.builds(
                kv_pb2.DeleteRequest,
                key=KEYS,
                prefix=st.booleans(),
                allow_missing=st.booleans(),
                if_mod_revision=INT64,
                if_version=INT64,
                return_previous=st.booleans(),
            ),
            "List": list_requests(page_tokens),
            "Watch": st.builds(
                kv_pb2.WatchRequest,
                key=KEYS,
                prefix=st.booleans(),
                start_revision=INT64,
                include_initial_state=st.booleans(),
                include_previous=st.booleans(),
                progress_interval_ms=INT64,
            ),
            "Status": st.just(kv_pb2.StatusRequest()),
        }
        return strategies[name]
    compat: dict[str, st.SearchStrategy[Message]] = {
        "Set": st.builds(compat_pb2.SetRequest, key=KEYS, value=st.text(max_size=20)),
        "PutKey": st.builds(compat_pb2.PutKeyRequest, key=KEYS, body=BODIES),
        "Get": st.builds(compat_pb2.GetRequest, key=KEYS),
        "LocalRead": st.builds(compat_pb2.LocalReadRequest, key=KEYS),
        "Delete": st.builds(compat_pb2.DeleteRequest, key=KEYS),
        "All": st.just(compat_pb2.AllRequest()),
        "Health": st.just(compat_pb2.HealthRequest()),
    }
    return compat[name]


# Mutations of an encoding.

FIELD_NUMBERS = st.one_of(st.integers(1, 12), st.sampled_from([0, 15, 16, 2047, 2048, 19000, 536870911]))


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with one hostile change on the wire."""
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "insert",
                "wrong_wire_type",
                "huge_varint",
                "huge_length",
                "out_of_range",
                "repeat",
                "unknown_field",
                "invalid_wire_type",
                "deep_groups",
                "deep_messages",
                "bad_utf8",
            ]
        )
    )
    position = draw(st.integers(0, len(data)))
    number = draw(FIELD_NUMBERS)
    if kind == "truncate":
        return data[:position]
    if kind == "flip":
        if not data:
            return b"\xff"
        index = position % len(data)
        return data[:index] + bytes([data[index] ^ draw(st.integers(1, 255))]) + data[index + 1 :]
    if kind == "insert":
        return data[:position] + draw(st.binary(min_size=1, max_size=8)) + data[position:]
    if kind == "wrong_wire_type":
        wire_type = draw(st.sampled_from([VARINT, I64, LEN, I32]))
        payload = {VARINT: varint(1), I64: b"\x01" * 8, LEN: varint(2) + b"ab", I32: b"\x01" * 4}[wire_type]
        return data + tag(number, wire_type) + payload
    if kind == "huge_varint":
        value = draw(
            st.sampled_from(
                [
                    varint(2**64 - 1),
                    varint(2**63),
                    b"\xff" * 10 + b"\x01",  # 11 bytes: longer than any varint may be
                    b"\x80" * 9 + b"\x00",  # zero, spelled with every byte a varint may have
                    b"\xff" * 5,  # unterminated
                ]
            )
        )
        return data + tag(number, VARINT) + value
    if kind == "huge_length":
        length = draw(st.sampled_from([2**31 - 1, 2**31, 2**32 + 3, 2**63, 5]))
        return data + tag(number, LEN) + varint(length) + b"abc"
    if kind == "out_of_range":
        # Values that do not fit the field's type: bools other than 0/1, int32 fields given 64 bits.
        return data + tag(number, VARINT) + varint(draw(st.sampled_from([2, 255, 2**32 + 5, 2**40, -5])))
    if kind == "repeat":
        return data + data
    if kind == "unknown_field":
        big = draw(st.integers(13, 536870911))
        return data + length_delimited(big, draw(st.binary(max_size=16))) + tag(big + 1, VARINT) + varint(1)
    if kind == "invalid_wire_type":
        return data + tag(number, draw(st.sampled_from([6, 7, EGROUP, SGROUP])))
    if kind == "deep_groups":
        return data + nested_groups(max(number, 13), draw(st.sampled_from([10, 99, 100, 101, 500, 5000])))
    if kind == "deep_messages":
        return data + nested_messages(number or 2, draw(st.sampled_from([10, 100, 101, 1000])))
    bad = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80", b"\xf4\x90\x80\x80"]))
    return data + length_delimited(number, bad)


@st.composite
def fuzzed(draw: st.DrawFn, page_tokens: list[str]) -> tuple[str, bytes]:
    method = draw(st.sampled_from(METHODS))
    how = draw(st.sampled_from(["random", "mutated", "mutated", "twice", "valid"]))
    if how == "random":
        return method, draw(st.binary(max_size=64))
    data = draw(valid_requests(method, page_tokens)).SerializeToString(deterministic=True)
    if how == "valid":
        return method, data
    data = draw(mutated(data))
    return method, draw(mutated(data)) if how == "twice" else data


def fixed_corpus() -> list[tuple[str, bytes]]:
    """Payloads every run sends, whatever hypothesis draws."""
    hostile = [
        b"",
        b"\x00",
        b"\xff" * 32,
        b"\x08" + b"\xff" * 10 + b"\x01",
        tag(1, LEN) + varint(2**31),
        tag(1, LEN) + varint(3) + b"\xff\xfe\xfd",
        nested_groups(99, 10_000),
        nested_messages(2, 2_000),
        tag(0, VARINT) + varint(1),
        tag(19000, VARINT) + varint(1),  # a reserved field number
        length_delimited(1, b"k") * 1000,
    ]
    values = [
        kv_pb2.PutRequest(key="huge-ttl", value="v", ttl_ms=2**63 - 1),
        kv_pb2.PutRequest(key="year-10000-ttl", value="v", ttl_ms=300_000_000_000_000),
        kv_pb2.PutRequest(key="negative-ttl", value="v", ttl_ms=-1),
        kv_pb2.PutRequest(key="cas", value="v", if_mod_revision=2**63 - 1, if_version=-(2**63)),
        kv_pb2.PutValueRequest(key="huge-ttl-raw", body=httpbody_pb2.HttpBody(data=b"v"), ttl_ms=2**62),
        kv_pb2.ListRequest(page_size=2**31 - 1),
        kv_pb2.ListRequest(page_size=-(2**31)),
        kv_pb2.ListRequest(page_token="e30.AAAA"),
        kv_pb2.ListRequest(prefix="\U0010ffff" * 3),
        kv_pb2.ListRequest(start_key="b", end_key="a"),
        kv_pb2.WatchRequest(key="a", start_revision=2**63 - 1),
        kv_pb2.WatchRequest(key="a", progress_interval_ms=2**63 - 1),
        kv_pb2.WatchRequest(key="a", start_revision=-(2**63)),
        kv_pb2.DeleteRequest(key="", prefix=True, if_version=1),
        kv_pb2.DeleteRequest(key="absent", if_mod_revision=2**63 - 1),
    ]
    payloads = [(method, data) for method in METHODS for data in hostile]
    for message in values:
        method = next(name for name, type_ in REQUEST_TYPES.items() if type_ is type(message))
        payloads.append((method, message.SerializeToString()))
    return payloads


# Sending and accounting.


@dataclass
class Ledger:
    """What the fuzzed requests did: the statuses seen, and the effects of those that succeeded."""

    sent: int = 0
    skipped: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    puts: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    ttl_keys: set[str] = field(default_factory=set)
    slowest_s: float = 0.0


def parse(method: str, payload: bytes) -> Message | None:
    try:
        return REQUEST_TYPES[method].FromString(payload)
    except DecodeError:
        return None


def addresses_sentinels(method: str, request: Message | None) -> bool:
    key = getattr(request, "key", None)
    if not isinstance(key, str):
        return False
    if method == f"{KV}Delete" and getattr(request, "prefix", False):
        return any(sentinel.startswith(key) for sentinel in SENTINELS)
    return key.startswith(SENTINEL_PREFIX)


def send(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, bytes, str]:
    """The status, response bytes and details of one raw call."""
    if method.endswith("/Watch"):
        stream = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        call = stream(payload, timeout=WATCH_WINDOW_S)
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            code = error.code()
            # The deadline is how the client leaves an accepted watch: for the server, a success.
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return grpc.StatusCode.OK, b"", ""
            return code, b"", str(error.details())
        return grpc.StatusCode.OK, b"", ""
    unary = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        response: bytes = unary(payload, timeout=UNARY_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), b"", str(error.details())
    return grpc.StatusCode.OK, response, ""


def fuzz_one(channel: grpc.Channel, ledger: Ledger, method: str, payload: bytes) -> None:
    request = parse(method, payload)
    if addresses_sentinels(method, request):
        ledger.skipped += 1
        return
    started = time.monotonic()
    code, response, details = send(channel, method, payload)
    took = time.monotonic() - started
    ledger.slowest_s = max(ledger.slowest_s, took)
    ledger.sent += 1
    ledger.statuses[code.name] += 1
    ledger.by_method[method] += 1
    assert code in ALLOWED, (
        f"{method} answered {code.name} ({details!r}) to {payload[:200]!r}"
        f" ({len(payload)} bytes, parsed as {request!r:.300})"
    )
    if code != grpc.StatusCode.OK:
        return
    assert request is not None, f"{method} accepted bytes that do not parse: {payload[:200]!r}"
    if method in PUT_METHODS:
        key: str = getattr(request, "key")  # noqa: B009
        ledger.puts[key] += 1
        if getattr(request, "ttl_ms", 0) > 0:
            ledger.ttl_keys.add(key)
    elif method == f"{KV}Delete":
        ledger.deleted += kv_pb2.DeleteResponse.FromString(response).deleted
    elif method == f"{COMPAT}Delete":
        ledger.deleted += 1


def history_since(stub: kv_pb2_grpc.KeyValueStub, start: int, end: int) -> list[kv_pb2.Event]:
    """Every event with start <= revision <= end, replayed by a Watch of all keys."""
    events: list[kv_pb2.Event] = []
    if end < start:
        return events
    call = stub.Watch(kv_pb2.WatchRequest(key="", prefix=True, start_revision=start), timeout=60)
    try:
        for message in call:
            assert not message.HasField("cancel"), message.cancel
            events += [event for event in message.events if event.entry.mod_revision <= end]
            if message.header.revision >= end:
                break
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() untyped
    return events


def check_health(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kv.v1.KeyValue"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=UNARY_TIMEOUT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def run_fuzzing(channel: grpc.Channel, ledger: Ledger, page_tokens: list[str]) -> None:
    for method, payload in fixed_corpus():
        fuzz_one(channel, ledger, method, payload)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(batch=st.lists(fuzzed(page_tokens), min_size=BATCH, max_size=BATCH))
    @example(batch=[(method, b"\x0a\x01a") for method in METHODS])
    def fuzz(batch: list[tuple[str, bytes]]) -> None:
        for method, payload in batch:
            fuzz_one(channel, ledger, method, payload)

    fuzz()


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_fuzzed_requests_get_documented_statuses_and_change_nothing_when_rejected(
    tmp_path: Path, store: str
) -> None:
    server = ServerProcess(tmp_path, store=store)
    server.start()
    started = time.monotonic()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kv_pb2_grpc.KeyValueStub(channel)
            for key, value in SENTINELS.items():
                stub.Put(kv_pb2.PutRequest(key=key, value=value), timeout=UNARY_TIMEOUT_S)
            page = stub.List(kv_pb2.ListRequest(prefix=SENTINEL_PREFIX, page_size=1), timeout=UNARY_TIMEOUT_S)
            page_tokens = [page.next_page_token]
            before = {
                key: stub.Get(kv_pb2.GetRequest(key=key), timeout=UNARY_TIMEOUT_S).entry for key in SENTINELS
            }
            first = stub.Status(kv_pb2.StatusRequest(), timeout=UNARY_TIMEOUT_S).header.revision

            ledger = Ledger()
            run_fuzzing(channel, ledger, page_tokens)

            assert server.process is not None
            assert server.process.poll() is None, "the server died"
            check_health(channel)
            last = stub.Status(kv_pb2.StatusRequest(), timeout=UNARY_TIMEOUT_S).header.revision
            history = history_since(stub, first + 1, last)
            after = {
                key: stub.Get(kv_pb2.GetRequest(key=key), timeout=UNARY_TIMEOUT_S).entry for key in SENTINELS
            }
    finally:
        server.kill()
    elapsed = time.monotonic() - started
    print(
        f"\n{store}: {ledger.sent} fuzzed requests in {elapsed:.1f} s ({ledger.skipped} skipped as aimed at"
        f" the sentinels), slowest {ledger.slowest_s * 1000:.0f} ms; statuses {dict(ledger.statuses)};"
        f" {len(history)} events"
    )
    assert ledger.sent >= MIN_REQUESTS
    thin = {method: ledger.by_method[method] for method in METHODS if ledger.by_method[method] < 50}
    assert not thin, f"methods that got few requests: {thin}"
    assert after == before, "the sentinel keys changed"
    # Every revision is one event, and every event comes from a request that succeeded.
    assert [event.entry.mod_revision for event in history] == list(range(first + 1, last + 1))
    kinds: dict[int, list[str]] = {}
    for event in history:
        kinds.setdefault(event.type, []).append(event.entry.key)
    assert Counter(kinds.get(kv_pb2.Event.TYPE_PUT, [])) == ledger.puts
    assert len(kinds.get(kv_pb2.Event.TYPE_DELETE, [])) == ledger.deleted
    assert set(kinds.get(kv_pb2.Event.TYPE_EXPIRE, [])) <= ledger.ttl_keys
    unexpected = [line for line in server.log().splitlines() if "unexpected" in line or "Traceback" in line]
    assert not unexpected, "\n".join(unexpected[:20])
