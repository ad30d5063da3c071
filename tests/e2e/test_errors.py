"""Errors over REST: every error body is google.rpc.Status as JSON, {"code": <gRPC code>,
"message": "...", "details": [...]}, whether kv-server sent it (through the transcoder) or Envoy
made it itself (local replies: unknown route, body too large, upstream down, ...). Bad input
changes nothing, and the server and the gateway stay up."""

from __future__ import annotations

import base64
import json
import socket
from typing import TYPE_CHECKING

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway, Reply, StartGateway

pytestmark = pytest.mark.gateway

JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
MIB = 1024 * 1024
OVER_BODY_LIMIT = 1_600_000  # max_request_body_size in gateway/envoy.yaml is 1,500,000


def assert_status(reply: Reply, http_status: int, code: int) -> dict[str, object]:
    """`reply` is the HTTP status and a google.rpc.Status JSON body with this gRPC code."""
    assert reply.status == http_status, reply
    assert reply.content_type == "application/json", reply
    body = reply.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str), body
    assert body["message"], body
    assert body["details"] == [], body
    return dict(body)


# (method, path, body, headers, HTTP status, gRPC code); {k} is an existing key, {a} an absent one.
BAD_REQUESTS: list[tuple[str, str, str | bytes | None, dict[str, str], int, int]] = [
    # Malformed or mistyped JSON.
    ("PUT", "/v1/kv/{k}", "{bad", JSON, 400, 3),
    ("PUT", "/v1/kv/{k}", '{"value": 5}', JSON, 400, 3),
    ("PUT", "/v1/kv/{k}", '{"ttl_ms": "soon"}', JSON, 400, 3),
    ("PUT", "/v1/kv/{k}", '{"value_bytes": "not base64!"}', JSON, 400, 3),
    ("PUT", "/v1/kv/{k}", b'{"value": "\xff"}', JSON, 400, 3),
    ("POST", "/v1/watch", "{bad", JSON, 400, 3),
    ("POST", "/set", '{"key": "{k}", "value": ["x"]}', JSON, 400, 3),
    # The JSON routes take JSON whatever the content type says: a form body is malformed.
    ("POST", "/set", "key=a&value=b", FORM, 400, 3),
    ("POST", "/put", "key=a&value=b", FORM, 400, 3),
    # Rules of the contract (kv-server).
    ("PUT", "/v1/kv/{k}", '{"value": "x", "ttl_ms": "-5"}', JSON, 400, 3),
    ("PUT", "/v1/kv/{k}", '{"value": "x", "if_absent": true, "if_present": true}', JSON, 400, 3),
    ("POST", "/set", '{"key": "", "value": "x"}', JSON, 400, 3),
    ("POST", "/set", "", JSON, 400, 3),
    ("GET", "/get", None, {}, 400, 3),
    ("GET", "/kv/", None, {}, 400, 3),
    ("PUT", "/v1/kv", '{"value": "x"}', JSON, 400, 3),
    ("GET", "/v1/kv?prefix=a&start_key=b", None, {}, 400, 3),
    ("GET", "/v1/watch?key=", None, {}, 400, 3),
    # Query parameters: unknown, mistyped, out of range; page tokens not issued by the server.
    ("GET", "/v1/kv/{k}?colour=red", None, {}, 400, 3),
    ("GET", "/get?key={k}&colour=red", None, {}, 400, 3),
    ("PUT", "/kv/{k}?ttl_ms=5", "x", {}, 400, 3),
    ("GET", "/v1/kv?page_size=abc", None, {}, 400, 3),
    ("GET", "/v1/kv?page_size=5000", None, {}, 400, 3),
    ("GET", "/v1/kv?page_size=-1", None, {}, 400, 3),
    ("GET", "/v1/kv?keys_only=maybe", None, {}, 400, 3),
    ("GET", "/v1/kv?page_token=garbage", None, {}, 400, 3),
    ("GET", "/v1/kv?page_token=eyJyIjoxfQ.c2ln", None, {}, 400, 3),
    # Unknown routes and methods.
    ("GET", "/nope", None, {}, 404, 5),
    ("GET", "/v2/kv/{k}", None, {}, 404, 5),
    ("POST", "/kv/{k}", "x", {}, 404, 5),
    ("PATCH", "/v1/kv/{k}", "{}", JSON, 404, 5),
    ("GET", "/", None, {}, 404, 5),
    # Absent keys and failed conditions.
    ("GET", "/v1/kv/{a}", None, {}, 404, 5),
    ("GET", "/v1/raw/{a}", None, {}, 404, 5),
    ("GET", "/kv/{a}", None, {}, 404, 5),
    ("GET", "/keys/{a}", None, {}, 404, 5),
    ("GET", "/get?key={a}", None, {}, 404, 5),
    ("DELETE", "/v1/kv/{a}", None, {}, 404, 5),
    ("DELETE", "/delete?key={a}", None, {}, 404, 5),
    ("PUT", "/v1/kv/{k}", '{"value": "x", "if_absent": true}', JSON, 409, 10),
    ("PUT", "/v1/raw/{k}?if_version=99", "x", {}, 409, 10),
    ("DELETE", "/v1/kv/{k}?if_mod_revision=999999", None, {}, 409, 10),
    # Values over max_value_bytes (1 MiB) in a body under the gateway's limit: kv-server's 400.
    ("PUT", "/v1/raw/{k}", b"v" * (MIB + 1), {}, 400, 3),
    ("PUT", "/kv/{k}", b"v" * (MIB + 1), {}, 400, 3),
    ("PUT", "/keys/{k}", b"v" * (MIB + 1), {}, 400, 3),
    ("PUT", "/v1/kv/{k}", json.dumps({"value": "v" * (MIB + 1)}), JSON, 400, 3),
    (
        "PUT",
        "/v1/kv/{k}",
        json.dumps({"value_bytes": base64.b64encode(b"\xff" * (MIB + 1)).decode()}),
        JSON,
        400,
        3,
    ),
    ("POST", "/set", json.dumps({"key": "{k}", "value": "v" * (MIB + 1)}), JSON, 400, 3),
    # Bodies over max_request_body_size: Envoy's 413, RESOURCE_EXHAUSTED.
    ("PUT", "/v1/raw/{k}", b"v" * OVER_BODY_LIMIT, {}, 413, 8),
    ("PUT", "/kv/{k}", b"v" * OVER_BODY_LIMIT, {}, 413, 8),
    ("PUT", "/keys/{k}", b"v" * OVER_BODY_LIMIT, {}, 413, 8),
    ("PUT", "/v1/kv/{k}", json.dumps({"value": "v" * OVER_BODY_LIMIT}), JSON, 413, 8),
    ("POST", "/set", json.dumps({"key": "{k}", "value": "v" * OVER_BODY_LIMIT}), JSON, 413, 8),
]


def fill(template: str | bytes | None, key: str, absent: str) -> str | bytes | None:
    if not isinstance(template, str):
        return template
    return template.replace("{k}", key).replace("{a}", absent)


def test_bad_requests_get_status_json_and_change_nothing(gateway: Gateway, keyspace: str) -> None:
    keys = [f"{keyspace}k{i}" for i in range(3)]
    for key in keys:
        gateway.put(key, b"original " + key.encode())
    before_revision = gateway.revision()
    before = gateway.get_json(f"/v1/kv?prefix={keyspace}")["entries"]

    failures = []
    for method, path, body, headers, http_status, code in BAD_REQUESTS:
        target = str(fill(path, keys[0], f"{keyspace}absent"))
        reply = gateway.request(method, target, fill(body, keys[0], "absent"), headers)
        try:
            assert_status(reply, http_status, code)
        except AssertionError as error:
            failures.append(f"{method} {target[:80]}: {error}")
    assert not failures, "\n".join(failures)

    assert gateway.request("GET", "/health").status == 200
    assert gateway.revision() == before_revision
    assert gateway.get_json(f"/v1/kv?prefix={keyspace}")["entries"] == before
    for key in keys:
        assert gateway.stored(key) == b"original " + key.encode()


def test_a_value_of_exactly_max_value_bytes_is_accepted(gateway: Gateway, keyspace: str) -> None:
    value = bytes(range(256)) * (MIB // 256)
    reply = gateway.request("PUT", f"/v1/raw/{keyspace}big", value, {"content-type": "application/x-big"})
    assert reply.status == 201, reply
    reply = gateway.request("GET", f"/v1/raw/{keyspace}big")
    assert (reply.status, reply.content_type, reply.body == value) == (200, "application/x-big", True)


def test_headers_over_envoys_limit_are_431_invalid_argument(gateway: Gateway) -> None:
    reply = gateway.request("GET", "/v1/status", headers={"x-padding": "a" * 70_000})
    assert_status(reply, 431, 3)


def test_http_1_0_is_426_unimplemented(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.rest_port), timeout=10) as connection:
        connection.sendall(b"GET /v1/status HTTP/1.0\r\nHost: kv\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426"), data
    document = json.loads(body)
    assert (document["code"], document["details"]) == (12, [])


def test_unknown_json_fields_are_dropped_by_the_transcoder(gateway: Gateway, keyspace: str) -> None:
    """A documented limit of Envoy's transcoder (envoyproxy/envoy#46623): there is no option to
    reject them, so a misspelt field is ignored. docs/rest.md says so."""
    reply = gateway.request("PUT", f"/v1/kv/{keyspace}k", '{"valeu": "x"}', JSON)
    assert reply.status == 201
    assert gateway.stored(f"{keyspace}k") == b""


def test_with_kv_server_down_rest_is_503_unavailable_and_envoy_stays_up(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    gateway.put("k", b"v")
    gateway.server.kill()

    for method, path, body in [
        ("GET", "/v1/kv/k", None),
        ("PUT", "/v1/kv/k", '{"value": "x"}'),
        ("PUT", "/kv/k", "x"),
        ("GET", "/get?key=k", None),
        ("GET", "/health", None),
        ("GET", "/v1/watch?key=k", None),
    ]:
        body_json = assert_status(gateway.request(method, path, body), 503, 14)
        assert "upstream connect error" in str(body_json["message"])
    # Envoy's own answers still come, and its admin says it is live.
    assert_status(gateway.request("GET", "/nope"), 404, 5)
    assert gateway.admin("/ready").body.strip() == b"LIVE"
    assert gateway.envoy is not None
    assert gateway.envoy.poll() is None

    # A gRPC client through Envoy gets UNAVAILABLE with Envoy's plain message, not the JSON body.
    with grpc.insecure_channel(gateway.host) as channel, pytest.raises(grpc.RpcError) as failure:
        kv_pb2_grpc.KeyValueStub(channel).Get(kv_pb2.GetRequest(key="k"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(failure.value.details()).startswith("upstream connect error")

    # kv-server back on the same port: REST works again, with the data written before.
    gateway.server.start()
    assert gateway.get_json("/kv/k")["value"] == "v"


def test_grpc_through_the_gateway_is_untouched(gateway: Gateway, keyspace: str) -> None:
    """The same port passes gRPC through: statuses stay gRPC statuses, 201 is for REST only."""
    with grpc.insecure_channel(gateway.host) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        created = stub.Put(kv_pb2.PutRequest(key=f"{keyspace}g", value="v"), timeout=10)
        assert created.created
        with pytest.raises(grpc.RpcError) as failure:
            stub.Get(kv_pb2.GetRequest(key=f"{keyspace}absent"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
