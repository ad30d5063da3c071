"""The REST gateway (the real Envoy, configured as `make run` does) in front of a kv-server with
bearer tokens: Envoy forwards the Authorization header, so REST is refused and allowed exactly
as gRPC is; HTTPS on the REST port with TLS (and mutual TLS) to kv-server; the rate limit."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from scripts.certs import CertSet
from scripts.serve import UpstreamTls, gateway_settings
from tests.security.kit import TOKENS, WRONG_SECRET, Envoy, bearer

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.api.auth import PERMISSION_DENIED_MESSAGE, UNAUTHENTICATED_MESSAGE
from kvtest import ServerProcess

pytestmark = pytest.mark.gateway

ADMIN, READER, TEAM = TOKENS["admin"], TOKENS["reader"], TOKENS["team"]
UNAUTHENTICATED = {"code": 16, "message": UNAUTHENTICATED_MESSAGE, "details": []}
PERMISSION_DENIED = {"code": 7, "message": PERMISSION_DENIED_MESSAGE, "details": []}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tokens_file: Path) -> Iterator[Envoy]:
    """A plaintext gateway in front of a kv-server with tokens (one pair for the module)."""
    directory = tmp_path_factory.mktemp("gateway")
    server = ServerProcess(directory, "--auth-tokens", str(tokens_file))
    server.start()
    envoy = Envoy(directory / "envoy", server.port)
    try:
        envoy.start(ADMIN.header)
        yield envoy
    finally:
        envoy.stop()
        server.kill()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/kv/rest-key", None),
        ("PUT", "/v1/kv/rest-key", '{"value": "v"}'),
        ("DELETE", "/v1/kv/rest-key", None),
        ("GET", "/v1/kv?prefix=rest", None),
        ("GET", "/v1/watch?key=rest-key", None),
        ("GET", "/v1/status", None),
        ("GET", "/v1/raw/rest-key", None),
        ("PUT", "/v1/raw/rest-key", "raw"),
        ("POST", "/set", '{"key": "rest-key", "value": "v"}'),
        ("PUT", "/kv/rest-key", "raw"),
        ("GET", "/get?key=rest-key", None),
        ("GET", "/local_read?key=rest-key", None),
        ("DELETE", "/kv/rest-key", None),
        ("GET", "/all", None),
        ("GET", "/health", None),
    ],
)
def test_rest_refuses_a_missing_or_wrong_token_with_401(
    gateway: Envoy, method: str, path: str, body: str | None
) -> None:
    for headers in ({}, {"authorization": f"Bearer {WRONG_SECRET}"}, {"authorization": "Basic eDp5"}):
        reply = gateway.request(method, path, body, headers)
        assert reply.status == 401, (headers, reply)
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == UNAUTHENTICATED


def test_rest_with_a_valid_token(gateway: Envoy) -> None:
    put = gateway.request("PUT", "/v1/kv/rest/a", '{"value": "hello"}', ADMIN.header)
    assert put.status in (200, 201), put
    got = gateway.request("GET", "/v1/kv/rest/a", headers=ADMIN.header)
    assert got.status == 200
    assert got.json()["entry"]["value"] == "hello"
    assert gateway.request("GET", "/v1/kv/rest/a", headers=READER.header).status == 200
    # A watch stream over REST is authorised like the rest: its first line is the initial state.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.rest_port, timeout=10)
    try:
        connection.request("GET", "/v1/watch?key=rest/a&include_initial_state=true", headers=READER.header)
        response = connection.getresponse()
        assert response.status == 200
        first = json.loads(response.readline())
        assert [entry["key"] for entry in first["initial_entries"]] == ["rest/a"]
    finally:
        connection.close()


def test_rest_refuses_what_the_token_does_not_allow_with_403(gateway: Envoy) -> None:
    assert gateway.request("PUT", "/v1/kv/rest/b", '{"value": "1"}', ADMIN.header).status in (200, 201)
    refusals = [
        (READER, "PUT", "/v1/kv/rest/b", '{"value": "2"}'),
        (READER, "DELETE", "/v1/kv/rest/b", None),
        (READER, "POST", "/set", '{"key": "rest/b", "value": "2"}'),
        (TEAM, "GET", "/v1/kv/rest/b", None),
        (TEAM, "PUT", "/v1/kv/rest/b", '{"value": "2"}'),
        (TEAM, "GET", "/v1/kv?prefix=rest/", None),
        (TEAM, "GET", "/all", None),
    ]
    for token, method, path, body in refusals:
        reply = gateway.request(method, path, body, token.header)
        assert reply.status == 403, (token.name, method, path, reply)
        assert reply.json() == PERMISSION_DENIED
    got = gateway.request("GET", "/v1/kv/rest/b", headers=ADMIN.header)
    assert got.json()["entry"]["value"] == "1"  # nothing changed
    assert gateway.request("PUT", "/v1/kv/team/b", '{"value": "t"}', TEAM.header).status in (200, 201)
    listed = gateway.request("GET", "/v1/kv?prefix=team/", headers=TEAM.header)
    assert [entry["key"] for entry in listed.json()["entries"]] == ["team/b"]


def test_a_watch_over_rest_needs_a_token(gateway: Envoy) -> None:
    path = "/v1/watch?key=rest/w&include_initial_state=true"
    assert gateway.request("GET", path).status == 401
    reply = gateway.request("GET", "/v1/watch?key=other&include_initial_state=true", headers=TEAM.header)
    assert reply.status == 403
    assert reply.json() == PERMISSION_DENIED


def test_grpc_through_the_gateway_needs_a_token(gateway: Envoy) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.rest_port}") as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Status(kv_pb2.StatusRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            stub.Status(kv_pb2.StatusRequest(), timeout=5, metadata=bearer(ADMIN.secret)).header.revision >= 0
        )


def test_the_rate_limit_answers_429_with_json(tmp_path: Path, gateway: Envoy) -> None:
    limited = Envoy(tmp_path / "envoy", gateway.grpc_port, rate_limit=(1, 2))
    try:
        limited.start(ADMIN.header)
        replies = [limited.request("GET", "/v1/status", headers=ADMIN.header) for _ in range(10)]
    finally:
        limited.stop()
    statuses = [reply.status for reply in replies]
    assert 429 in statuses, statuses
    assert set(statuses) <= {200, 429}
    rejected = next(reply for reply in replies if reply.status == 429)
    assert rejected.headers["content-type"] == "application/json"
    assert rejected.json()["code"] == 8  # RESOURCE_EXHAUSTED
    assert json.loads(rejected.body)["message"]


def test_https_on_the_rest_port_and_mutual_tls_to_kv_server(
    tmp_path: Path, certs: CertSet, tokens_file: Path
) -> None:
    server = ServerProcess(
        tmp_path,
        *("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)),
        *("--tls-client-ca", str(certs.ca), "--auth-tokens", str(tokens_file)),
    )
    server.start()
    envoy = Envoy(
        tmp_path / "envoy",
        server.port,
        rest_tls=(certs.server_cert, certs.server_key),
        upstream_tls=UpstreamTls(certs.ca, certs.client_cert, certs.client_key),
        ca=certs.ca,
    )
    try:
        envoy.start(ADMIN.header)
        put = envoy.request("PUT", "/v1/kv/secure", '{"value": "s"}', ADMIN.header)
        assert put.status in (200, 201), put
        assert envoy.request("GET", "/v1/kv/secure", headers=ADMIN.header).json()["entry"]["value"] == "s"
        assert envoy.request("GET", "/v1/kv/secure").status == 401
        # Plain HTTP to the HTTPS port gets no answer.
        plain = Envoy(envoy.directory, envoy.grpc_port, rest_port=envoy.rest_port)
        with pytest.raises((ConnectionError, OSError)):
            plain.request("GET", "/v1/kv/secure", headers=ADMIN.header)
        # A client that does not trust the gateway's CA refuses it.
        with pytest.raises(ssl.SSLError):
            Envoy(
                envoy.directory, envoy.grpc_port, rest_port=envoy.rest_port, _ssl=ssl.create_default_context()
            ).request("GET", "/v1/status")
    finally:
        envoy.stop()
        server.kill()


def test_serve_reads_the_gateway_settings_from_the_environment(certs: CertSet) -> None:
    assert gateway_settings({}, []) == (None, None, None)
    environ = {"KV_REST_TLS_CERT": str(certs.server_cert), "KV_REST_TLS_KEY": str(certs.server_key)}
    environ |= {"KV_REST_RATE_LIMIT": "50", "KV_GATEWAY_TLS_CA": str(certs.ca)}
    rest_tls, upstream, rate = gateway_settings(environ, ["--tls-cert", "c", "--tls-key", "k"])
    assert rest_tls == (certs.server_cert, certs.server_key)
    assert upstream == UpstreamTls(certs.ca)
    assert rate == (50, 100)
    with pytest.raises(ValueError, match="KV_GATEWAY_TLS_CA"):
        gateway_settings({"KV_TLS_CERT": "c", "KV_TLS_KEY": "k"}, [])
    with pytest.raises(ValueError, match="KV_GATEWAY_TLS_CERT"):
        gateway_settings(
            {"KV_GATEWAY_TLS_CA": "ca"}, ["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"]
        )
    with pytest.raises(ValueError, match="go together"):
        gateway_settings({"KV_REST_TLS_CERT": "c"}, [])


def test_oversized_headers_are_refused_with_431(gateway: Envoy) -> None:
    reply = gateway.request("GET", "/v1/status", headers={**ADMIN.header, "x-padding": "a" * 40_000})
    assert reply.status == 431
    assert reply.json()["code"] == 3  # INVALID_ARGUMENT
    assert (
        gateway.request("GET", "/v1/status", headers={**ADMIN.header, "x-padding": "a" * 8_000}).status == 200
    )
