"""Bearer tokens: every kv.v1 and compat RPC refuses a call without a valid token, a read-only
token cannot write, a prefix-limited token cannot touch other keys; health and reflection stay
open; a server without a token file is open as before."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tests.security.kit import REFUSED, TOKENS, WRONG_SECRET, Call, StartServer, bearer, every_call, invoke

import kvclient
from kv.compat.v1 import compat_pb2
from kv.v1 import kv_pb2
from kvserver.api.auth import (
    PERMISSION_DENIED_MESSAGE,
    RULES,
    UNAUTHENTICATED_MESSAGE,
    AuthConfigError,
    TokenAuthority,
)
from kvserver.server import RunningServer

ADMIN, READER, TEAM, TEAM_READER = (TOKENS[name] for name in ("admin", "reader", "team", "team-reader"))


@pytest.fixture
async def server(start_server: StartServer, tokens_file: Path) -> RunningServer:
    return await start_server(auth_tokens=str(tokens_file))


@pytest.fixture
async def channel(server: RunningServer) -> Any:
    async with grpc.aio.insecure_channel(server.address) as opened:
        yield opened


def test_every_method_of_both_services_has_a_rule_and_a_test_call() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (kv_pb2, compat_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(RULES) == methods
    assert {call.path for call in every_call("k")} == methods


BAD_CREDENTIALS = {
    "none": (),
    "wrong token": bearer(WRONG_SECRET),
    "empty bearer": (("authorization", "Bearer "),),
    "basic scheme": (("authorization", f"Basic {ADMIN.secret}"),),
    "token without scheme": (("authorization", ADMIN.secret),),
    "hash instead of token": bearer(hashlib.sha256(ADMIN.secret.encode()).hexdigest()),
    "two tokens": (*bearer(ADMIN.secret), *bearer(WRONG_SECRET)),
}


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
async def test_every_rpc_refuses_a_missing_or_wrong_token_alike(
    server: RunningServer, channel: grpc.aio.Channel, credentials: str
) -> None:
    revision = server.store.revision
    for call in every_call("k"):
        code, details = await invoke(channel, call, BAD_CREDENTIALS[credentials])
        # The same code and message whatever is wrong: nothing for a guesser to learn.
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE), call
    assert server.store.revision == revision  # no refused write changed anything
    assert server.hub.active == 0


async def test_a_malformed_request_without_a_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    put = channel.unary_unary("/kv.v1.KeyValue/Put", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await put(b"\xff\xff\xff", timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_read_write_token_reaches_every_rpc(server: RunningServer, channel: grpc.aio.Channel) -> None:
    for call in every_call("k"):
        code, details = await invoke(channel, call, ADMIN.metadata)
        assert code not in REFUSED, (call, code, details)
    # Both put methods, Set and PutKey wrote; the deletes removed the key again in between.
    assert server.store.revision > 0


async def test_a_read_only_token_reads_and_cannot_write(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    assert (await invoke(channel, every_call("k")[2], ADMIN.metadata))[0] == grpc.StatusCode.OK
    revision = server.store.revision
    for token in (READER, TEAM_READER):
        for call in every_call("team/k" if token.prefix else "k"):
            code, details = await invoke(channel, call, token.metadata)
            if call.write:
                assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE), call
            elif call.method.endswith("All") and token.prefix:
                assert code == grpc.StatusCode.PERMISSION_DENIED, call
            else:
                assert code not in REFUSED, (token.name, call, code, details)
    assert server.store.revision == revision
    # A prefix delete is a write too.
    prefix_delete = Call(
        "kv.v1.KeyValue/Delete", kv_pb2.DeleteRequest(key="", prefix=True), kv_pb2.DeleteResponse, True
    )
    assert (await invoke(channel, prefix_delete, READER.metadata))[0] == grpc.StatusCode.PERMISSION_DENIED


async def test_a_prefix_token_touches_only_its_prefix(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    for call in every_call("team/k"):
        code, details = await invoke(channel, call, TEAM.metadata)
        if call.method.endswith("All"):  # every key of the store: not for a prefix-limited token
            assert code == grpc.StatusCode.PERMISSION_DENIED
        else:
            assert code not in REFUSED, (call, code, details)
    assert (await invoke(channel, every_call("other")[2], ADMIN.metadata))[0] == grpc.StatusCode.OK
    revision = server.store.revision
    for key in ("other", "team", "tea", "team-x/k", "", "Team/k"):
        for call in every_call(key):
            if call.method.endswith(("Status", "Health")):
                continue  # no key
            code, details = await invoke(channel, call, TEAM.metadata)
            assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE), (
                key,
                call,
            )
    assert server.store.revision == revision


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (kv_pb2.ListRequest(), False),  # every key
        (kv_pb2.ListRequest(prefix="team/"), True),
        (kv_pb2.ListRequest(prefix="team/a"), True),
        (kv_pb2.ListRequest(prefix="team"), False),  # team-x/... too
        (kv_pb2.ListRequest(start_key="team/", end_key="team0"), True),  # exactly the prefix
        (kv_pb2.ListRequest(start_key="team/a", end_key="team/b"), True),
        (kv_pb2.ListRequest(start_key="team/a"), False),  # no end: runs past the prefix
        (kv_pb2.ListRequest(start_key="team/a", end_key="teamz"), False),
        (kv_pb2.ListRequest(start_key="tea", end_key="team/b"), False),
        (kv_pb2.ListRequest(end_key="team/b"), False),
        (kv_pb2.WatchRequest(key="team/", prefix=True, include_initial_state=True), True),
        (kv_pb2.WatchRequest(key="team/k", include_initial_state=True), True),
        (kv_pb2.WatchRequest(key="team", prefix=True, include_initial_state=True), False),
        (kv_pb2.WatchRequest(key="", prefix=True, include_initial_state=True), False),
        (kv_pb2.WatchRequest(key="other", include_initial_state=True), False),
        (kv_pb2.DeleteRequest(key="team/", prefix=True), True),
        (kv_pb2.DeleteRequest(key="team/old/", prefix=True), True),
        (kv_pb2.DeleteRequest(key="", prefix=True), False),
        (kv_pb2.DeleteRequest(key="te", prefix=True), False),
    ],
    ids=str,
)
async def test_listings_watches_and_prefix_deletes_stay_inside_the_prefix(
    server: RunningServer, channel: grpc.aio.Channel, request_: Any, allowed: bool
) -> None:
    await invoke(channel, every_call("other")[2], ADMIN.metadata)  # a key outside, to be protected
    method = {kv_pb2.ListRequest: "List", kv_pb2.WatchRequest: "Watch", kv_pb2.DeleteRequest: "Delete"}
    name = method[type(request_)]
    response = {"List": kv_pb2.ListResponse, "Watch": kv_pb2.WatchResponse, "Delete": kv_pb2.DeleteResponse}
    call = Call(f"kv.v1.KeyValue/{name}", request_, response[name], name == "Delete", stream=name == "Watch")
    code, details = await invoke(channel, call, TEAM.metadata)
    if allowed:
        assert code == grpc.StatusCode.OK, details
    else:
        assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE)
    assert (await invoke(channel, every_call("other")[0], ADMIN.metadata))[0] == grpc.StatusCode.OK


async def test_health_and_reflection_need_no_token(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kv.v1.KeyValue"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for reply in replies:
        names = {service.name for service in reply.list_services_response.service}
        assert {"kv.v1.KeyValue", "kv.compat.v1.CompatService", "grpc.health.v1.Health"} <= names
        break


async def test_kvclient_sends_its_token(server: RunningServer) -> None:
    async with kvclient.AsyncClient(server.address, token=TEAM.secret) as client:
        await client.put("team/a", b"1")
        assert (await client.get("team/a")).value == b"1"
        with pytest.raises(kvclient.PermissionDenied):
            await client.put("elsewhere", b"1")
    async with kvclient.AsyncClient(server.address, token=WRONG_SECRET) as client:
        with pytest.raises(kvclient.Unauthenticated):
            await client.get("team/a")


async def test_without_a_token_file_the_server_is_open(start_server: StartServer) -> None:
    server = await start_server()
    async with grpc.aio.insecure_channel(server.address) as channel:
        for call in every_call("k"):
            code, details = await invoke(channel, call)
            assert code not in REFUSED, (call, code, details)


# The token file.

DIGEST = hashlib.sha256(b"secret").hexdigest()


def test_the_token_file_holds_hashes_and_roles() -> None:
    authority = TokenAuthority.from_document(
        {
            "tokens": [
                {"name": "a", "token_sha256": DIGEST.upper(), "role": "read-only"},
                {"name": "b", "token_sha256": "0" * 64, "role": "read-write", "prefix": "b/"},
            ]
        }
    )
    assert [principal.name for principal in authority.principals] == ["a", "b"]
    found = authority.authenticate([("authorization", "bearer secret")])
    assert found is not None
    assert found.name == "a"


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"tokens": []},
        {"tokens": [{"name": "a", "token": "secret", "role": "read-only"}]},  # a plaintext token
        {"tokens": [{"name": "a", "token_sha256": "secret", "role": "read-only"}]},
        {"tokens": [{"name": "a", "token_sha256": DIGEST, "role": "admin"}]},
        {"tokens": [{"name": "", "token_sha256": DIGEST, "role": "read-only"}]},
        {"tokens": [{"name": "a", "token_sha256": DIGEST, "role": "read-only", "prefix": 1}]},
        {"tokens": [{"name": "a", "token_sha256": DIGEST, "role": "read-only"}] * 2},
        {
            "tokens": [
                {"name": "a", "token_sha256": DIGEST, "role": "read-only"},
                {"name": "b", "token_sha256": DIGEST, "role": "read-write"},
            ]
        },
        {"tokens": [{"name": "a", "token_sha256": DIGEST, "role": "read-only"}], "other": 1},
    ],
)
def test_a_bad_token_file_is_refused(document: dict[str, Any]) -> None:
    with pytest.raises(AuthConfigError):
        TokenAuthority.from_document(document)


async def test_a_server_with_a_bad_token_file_does_not_start(
    start_server: StartServer, tmp_path: Path
) -> None:
    bad = tmp_path / "tokens.toml"
    bad.write_text('[[tokens]]\nname = "a"\ntoken = "plaintext"\nrole = "read-only"\n')
    with pytest.raises(AuthConfigError):
        await start_server(auth_tokens=str(bad))
    with pytest.raises(OSError, match="No such file"):
        await start_server(auth_tokens=str(tmp_path / "missing.toml"))
