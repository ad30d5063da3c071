"""Bad input through a real gRPC server: INVALID_ARGUMENT naming the field, and nothing written.

Every case runs against each store backend (the `grpc_server` fixture). Before each bad request a
key is stored; afterwards the store revision and that key must be exactly as they were.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc

TIMEOUT_S = 10.0
EXISTING = "existing"
MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1024 * 1024

if TYPE_CHECKING:
    Stub = kv_pb2_grpc.KeyValueAsyncStub
    Send = Callable[[Stub, grpc.aio.Channel, str], Awaitable[object]]


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return kv_pb2_grpc.KeyValueStub(channel)


async def revision_of(stub: Stub) -> int:
    async with asyncio.timeout(TIMEOUT_S):
        return (await stub.Status(kv_pb2.StatusRequest())).header.revision


async def watch_all(call: grpc.aio.UnaryStreamCall[kv_pb2.WatchRequest, kv_pb2.WatchResponse]) -> None:
    """Read a watch stream to its end (it must end by itself, with an error)."""
    async with asyncio.timeout(TIMEOUT_S):
        async for _ in call:
            pass


async def raw_call(channel: grpc.aio.Channel, method: str, payload: bytes) -> object:
    """Send `payload` as the request bytes of `method`, bypassing the generated serialisers."""
    if method == "Watch":
        call = channel.unary_stream(
            f"/kv.v1.KeyValue/{method}", request_serializer=None, response_deserializer=None
        )
        async with asyncio.timeout(TIMEOUT_S):
            return [message async for message in call(payload)]
    unary = channel.unary_unary(
        f"/kv.v1.KeyValue/{method}", request_serializer=None, response_deserializer=None
    )
    async with asyncio.timeout(TIMEOUT_S):
        return await unary(payload)


async def first_page_token(stub: Stub, **request: object) -> str:
    for index in range(3):
        await stub.Put(kv_pb2.PutRequest(key=f"page/{index}", value="v"))
    page = await stub.List(kv_pb2.ListRequest(page_size=1, **request))  # type: ignore[arg-type]
    assert page.next_page_token
    return page.next_page_token


def flip_one_char(token: str, index: int | None = None) -> str:
    """Change one character (by default one of the signed body): the token still decodes, but
    its signature no longer matches. The last character is avoided: some of its bits are padding."""
    index = len(token) // 4 if index is None else index
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


def flip_signature_char(token: str) -> str:
    return flip_one_char(token, len(token) - 3)


@dataclass(frozen=True)
class BadRequest:
    name: str
    send: Send  # gets the stub, the channel and the page token made with `token_for`
    fields: tuple[str, ...]  # the message must name one of these; () for a request that is no message
    token_for: dict[str, object] | None = None  # the ListRequest fields of a first page to get a token from


def put(**fields: object) -> Send:
    return lambda stub, _, __: stub.Put(kv_pb2.PutRequest(**fields))  # type: ignore[arg-type]


def get(**fields: object) -> Send:
    return lambda stub, _, __: stub.Get(kv_pb2.GetRequest(**fields))  # type: ignore[arg-type]


def delete(**fields: object) -> Send:
    return lambda stub, _, __: stub.Delete(kv_pb2.DeleteRequest(**fields))  # type: ignore[arg-type]


def list_(**fields: object) -> Send:
    return lambda stub, _, __: stub.List(kv_pb2.ListRequest(**fields))  # type: ignore[arg-type]


def list_with_token(transform: Callable[[str], str] = str, **fields: object) -> Send:
    return lambda stub, _, token: stub.List(
        kv_pb2.ListRequest(page_size=1, page_token=transform(token), **fields)  # type: ignore[arg-type]
    )


def watch(**fields: object) -> Send:
    return lambda stub, _, __: watch_all(stub.Watch(kv_pb2.WatchRequest(**fields)))  # type: ignore[arg-type]


def raw(method: str, payload: bytes) -> Send:
    return lambda _, channel, __: raw_call(channel, method, payload)


# A key of 4097 bytes made of 2-, 3- and 4-byte characters (a character count under the limit).
OVERSIZED_KEYS = {
    "ascii": "k" * (MAX_KEY_BYTES + 1),
    "2-byte": "é" * 2048 + "a",
    "3-byte": "€" * 1365 + "ab",
    "4-byte": "🔑" * 1024 + "a",
}
assert all(len(key.encode()) == MAX_KEY_BYTES + 1 for key in OVERSIZED_KEYS.values())

# Field 1 (key), wire type 2 (length-delimited), 2 bytes that are not UTF-8.
NOT_UTF8_KEY = b"\x0a\x02\xff\xfe"
KEYED_METHODS = ("Get", "Put", "Delete", "Watch")
ALL_METHODS = ("Get", "Put", "Delete", "List", "Status", "Watch")

BAD_REQUESTS = [
    BadRequest("get-empty-key", get(key=""), ("key",)),
    BadRequest("put-empty-key", put(key="", value="v"), ("key",)),
    BadRequest("delete-empty-key", delete(key=""), ("key",)),
    BadRequest("watch-empty-key", watch(key=""), ("key",)),
    *(BadRequest(f"get-long-key-{kind}", get(key=key), ("key",)) for kind, key in OVERSIZED_KEYS.items()),
    *(
        BadRequest(f"put-long-key-{kind}", put(key=key, value="v"), ("key",))
        for kind, key in OVERSIZED_KEYS.items()
    ),
    BadRequest("delete-long-key", delete(key=OVERSIZED_KEYS["2-byte"]), ("key",)),
    BadRequest("delete-long-prefix", delete(key=OVERSIZED_KEYS["4-byte"], prefix=True), ("key",)),
    BadRequest("watch-long-key", watch(key=OVERSIZED_KEYS["3-byte"]), ("key",)),
    BadRequest("list-long-prefix", list_(prefix=OVERSIZED_KEYS["2-byte"]), ("prefix",)),
    BadRequest("list-long-start-key", list_(start_key=OVERSIZED_KEYS["ascii"]), ("start_key",)),
    *(
        BadRequest(f"{method.lower()}-key-not-utf8", raw(method, NOT_UTF8_KEY), ("key",))
        for method in KEYED_METHODS
    ),
    # key "existing" (field 1) and then field 2 (value, a string) holding bytes that are not UTF-8.
    BadRequest("put-value-not-utf8", raw("Put", b"\x0a\x08existing\x12\x02\xff\xfe"), ("value",)),
    BadRequest("list-prefix-not-utf8", raw("List", NOT_UTF8_KEY), ("prefix",)),
    BadRequest("list-token-not-utf8", raw("List", b"\x2a\x02\xff\xfe"), ("page_token",)),
    BadRequest(
        "put-value-over-limit",
        put(key=EXISTING, value_bytes=b"x" * (MAX_VALUE_BYTES + 1)),
        ("value",),
    ),
    BadRequest(
        "put-text-value-over-limit",
        put(key=EXISTING, value="é" * (MAX_VALUE_BYTES // 2) + "x"),
        ("value",),
    ),
    BadRequest("put-negative-ttl", put(key=EXISTING, value="new", ttl_ms=-1), ("ttl_ms",)),
    BadRequest("list-page-size-over-max", list_(page_size=1001), ("page_size",)),
    BadRequest("list-page-size-negative", list_(page_size=-1), ("page_size",)),
    BadRequest("list-tampered-token", list_with_token(flip_one_char), ("page_token",), token_for={}),
    BadRequest(
        "list-tampered-signature", list_with_token(flip_signature_char), ("page_token",), token_for={}
    ),
    BadRequest("list-random-token", list_(page_token="bm90IGEgdG9rZW4.c2lnbmF0dXJl"), ("page_token",)),
    BadRequest("list-garbage-token", list_(page_token="no such token, really! ✗"), ("page_token",)),
    BadRequest(
        "list-token-other-prefix",
        list_with_token(prefix="pag"),
        ("page_token",),
        token_for={"prefix": "page/"},
    ),
    BadRequest("list-token-other-start-key", list_with_token(start_key="a"), ("page_token",), token_for={}),
    BadRequest("list-token-other-end-key", list_with_token(end_key="zz"), ("page_token",), token_for={}),
    BadRequest("list-token-other-keys-only", list_with_token(keys_only=True), ("page_token",), token_for={}),
    BadRequest(
        "list-token-without-its-prefix", list_with_token(), ("page_token",), token_for={"prefix": "page/"}
    ),
    BadRequest(
        "put-if-absent-and-if-present",
        put(key=EXISTING, value="new", if_absent=True, if_present=True),
        ("if_absent", "if_present"),
    ),
    BadRequest(
        "put-if-absent-and-if-mod-revision",
        put(key=EXISTING, value="new", if_absent=True, if_mod_revision=1),
        ("if_absent", "if_mod_revision"),
    ),
    BadRequest(
        "put-if-absent-and-if-version",
        put(key=EXISTING, value="new", if_absent=True, if_version=1),
        ("if_absent", "if_version"),
    ),
    BadRequest("put-negative-if-mod-revision", put(key=EXISTING, if_mod_revision=-1), ("if_mod_revision",)),
    BadRequest("list-prefix-and-start-key", list_(prefix="a", start_key="b"), ("prefix", "start_key")),
    BadRequest("list-prefix-and-end-key", list_(prefix="a", end_key="b"), ("prefix", "end_key")),
    BadRequest(
        "delete-prefix-with-if-mod-revision",
        delete(key=EXISTING[:3], prefix=True, if_mod_revision=1),
        ("prefix", "if_mod_revision"),
    ),
    BadRequest(
        "delete-prefix-with-if-version",
        delete(key=EXISTING[:3], prefix=True, if_version=1),
        ("prefix", "if_version"),
    ),
    BadRequest(
        "watch-initial-state-and-start-revision",
        watch(key=EXISTING, include_initial_state=True, start_revision=1),
        ("include_initial_state", "start_revision"),
    ),
    BadRequest("watch-negative-start-revision", watch(key=EXISTING, start_revision=-1), ("start_revision",)),
    BadRequest(
        "watch-negative-progress-interval",
        watch(key=EXISTING, progress_interval_ms=-1),
        ("progress_interval_ms",),
    ),
    *(
        BadRequest(f"{method.lower()}-not-a-message", raw(method, b"\xff\xff\xff"), ())
        for method in ALL_METHODS
    ),
]


async def send_expecting_invalid_argument(
    stub: Stub, channel: grpc.aio.Channel, bad: BadRequest, token: str
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(TIMEOUT_S):
            await bad.send(stub, channel, token)
    error = raised.value
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{bad.name}: {error.code()} {details}"
    return details


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[bad.name for bad in BAD_REQUESTS])
async def test_bad_request_is_invalid_argument_and_writes_nothing(
    stub: Stub, channel: grpc.aio.Channel, bad: BadRequest
) -> None:
    await stub.Put(kv_pb2.PutRequest(key=EXISTING, value="original"))
    token = await first_page_token(stub, **bad.token_for) if bad.token_for is not None else ""
    before = await stub.Get(kv_pb2.GetRequest(key=EXISTING))
    revision = await revision_of(stub)

    details = await send_expecting_invalid_argument(stub, channel, bad, token)

    if bad.fields:
        assert any(field in details for field in bad.fields), details
    else:
        assert "not a valid kv.v1." in details, details
    assert await revision_of(stub) == revision
    after = await stub.Get(kv_pb2.GetRequest(key=EXISTING))
    assert after.entry == before.entry


async def test_bad_requests_in_a_row_write_nothing(stub: Stub, channel: grpc.aio.Channel) -> None:
    """Every bad request one after another on one server, the revision checked after each."""
    await stub.Put(kv_pb2.PutRequest(key=EXISTING, value="original"))
    tokens = {
        "": await first_page_token(stub),
        "page/": await first_page_token(stub, prefix="page/"),
    }
    before = await stub.Get(kv_pb2.GetRequest(key=EXISTING))
    keys_before = [entry.key for entry in (await stub.List(kv_pb2.ListRequest())).entries]
    revision = await revision_of(stub)
    for bad in BAD_REQUESTS:
        token = tokens[str(bad.token_for.get("prefix", ""))] if bad.token_for is not None else ""
        await send_expecting_invalid_argument(stub, channel, bad, token)
        assert await revision_of(stub) == revision, bad.name
    after = await stub.Get(kv_pb2.GetRequest(key=EXISTING))
    assert after.entry == before.entry
    assert [entry.key for entry in (await stub.List(kv_pb2.ListRequest())).entries] == keys_before


async def test_limits_are_inclusive(stub: Stub) -> None:
    """The largest key and value the limits allow are accepted (the bad cases are one over)."""
    status = await stub.Status(kv_pb2.StatusRequest())
    assert status.limits.max_key_bytes == MAX_KEY_BYTES
    assert status.limits.max_value_bytes == MAX_VALUE_BYTES
    key = "é" * (MAX_KEY_BYTES // 2)
    async with asyncio.timeout(TIMEOUT_S):
        await stub.Put(kv_pb2.PutRequest(key=key, value_bytes=b"\xff" * MAX_VALUE_BYTES))
        got = await stub.Get(kv_pb2.GetRequest(key=key))
    assert got.entry.value_bytes == b"\xff" * MAX_VALUE_BYTES


async def test_get_of_a_missing_key_is_not_found_naming_the_key(stub: Stub) -> None:
    revision = await revision_of(stub)
    for key in ("missing", "ключ/🔑"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(TIMEOUT_S):
                await stub.Get(kv_pb2.GetRequest(key=key))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert key in (raised.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Delete(kv_pb2.DeleteRequest(key="missing"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "missing" in (raised.value.details() or "")
    assert await revision_of(stub) == revision


@pytest.mark.parametrize(
    "request_fields",
    [
        {"if_absent": True},
        {"if_mod_revision": 99},
        {"if_version": 7},
    ],
    ids=["if-absent", "if-mod-revision", "if-version"],
)
async def test_failed_put_condition_is_aborted_and_writes_nothing(
    stub: Stub, request_fields: dict[str, object]
) -> None:
    await stub.Put(kv_pb2.PutRequest(key=EXISTING, value="original"))
    before = await stub.Get(kv_pb2.GetRequest(key=EXISTING))
    revision = await revision_of(stub)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(TIMEOUT_S):
            await stub.Put(kv_pb2.PutRequest(key=EXISTING, value="new", **request_fields))  # type: ignore[arg-type]
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert EXISTING in (raised.value.details() or "")
    assert await revision_of(stub) == revision
    assert (await stub.Get(kv_pb2.GetRequest(key=EXISTING))).entry == before.entry


async def test_failed_conditions_on_absent_keys_and_deletes_are_aborted(stub: Stub) -> None:
    await stub.Put(kv_pb2.PutRequest(key=EXISTING, value="original"))
    revision = await revision_of(stub)
    failing: list[Awaitable[object]] = [
        stub.Put(kv_pb2.PutRequest(key="absent", value="v", if_present=True)),
        stub.Put(kv_pb2.PutRequest(key="absent", value="v", if_mod_revision=1)),
        stub.Delete(kv_pb2.DeleteRequest(key=EXISTING, if_mod_revision=99)),
        stub.Delete(kv_pb2.DeleteRequest(key=EXISTING, if_version=99)),
    ]
    for call in failing:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(TIMEOUT_S):
                await call
        assert raised.value.code() == grpc.StatusCode.ABORTED, raised.value.details()
    assert await revision_of(stub) == revision
    assert (await stub.Get(kv_pb2.GetRequest(key=EXISTING))).entry.value == "original"
