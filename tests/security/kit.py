"""Helpers of the security tests: tokens, every RPC of both services, and Envoy in front of a
kv-server (rendered by scripts/serve.py as `make run` does, started without hot restart).

Imported as `tests.security.kit` (the conftest puts the repository root on sys.path).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.protobuf.message import Message
from scripts.serve import DESCRIPTOR, UpstreamTls, envoy_command, render_gateway_config

from kv.compat.v1 import compat_pb2
from kv.v1 import kv_pb2
from kvserver.server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
_TIMEOUT_S = 10.0

# The `start_server` fixture: `await start_server(store="memory", **config_overrides)`.
StartServer = Callable[..., Awaitable[RunningServer]]


@dataclass(frozen=True)
class Token:
    name: str
    secret: str
    role: str
    prefix: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.secret)

    @property
    def header(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secret}"}


TOKENS = {
    token.name: token
    for token in (
        Token("admin", "admin-9b1c7e0f4d2a", "read-write"),
        Token("reader", "reader-51f0c2aa93e8", "read-only"),
        Token("team", "team-c04d9e1b77f2", "read-write", "team/"),
        Token("team-reader", "team-reader-2e8a61d0c5b9", "read-only", "team/"),
    )
}
WRONG_SECRET = "not-a-configured-token"


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def write_tokens_file(path: Path) -> Path:
    """The TOKENS as an --auth-tokens file (hashes only)."""
    lines = []
    for token in TOKENS.values():
        digest = hashlib.sha256(token.secret.encode()).hexdigest()
        lines += [
            "[[tokens]]",
            f'name = "{token.name}"',
            f'token_sha256 = "{digest}"',
            f'role = "{token.role}"',
        ]
        if token.prefix:
            lines.append(f'prefix = "{token.prefix}"')
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass(frozen=True)
class Call:
    """One RPC with a request: `method` is "kv.v1.KeyValue/Get"."""

    method: str
    request: Message
    response_type: type[Message]
    write: bool
    stream: bool = False

    @property
    def path(self) -> str:
        return f"/{self.method}"

    def __str__(self) -> str:
        return self.method


def every_call(key: str) -> list[Call]:
    """Every method of kv.v1.KeyValue and kv.compat.v1.CompatService, each touching `key` (if
    it takes a key). Deletes allow a missing key where they can."""
    kv, compat = "kv.v1.KeyValue/", "kv.compat.v1.CompatService/"
    return [
        Call(kv + "Get", kv_pb2.GetRequest(key=key), kv_pb2.GetResponse, False),
        Call(kv + "GetValue", kv_pb2.GetValueRequest(key=key), httpbody_pb2.HttpBody, False),
        Call(kv + "Put", kv_pb2.PutRequest(key=key, value="v"), kv_pb2.PutResponse, True),
        Call(
            kv + "PutValue",
            kv_pb2.PutValueRequest(key=key, body=httpbody_pb2.HttpBody(data=b"v")),
            kv_pb2.PutValueResponse,
            True,
        ),
        Call(
            kv + "BatchPut",
            kv_pb2.BatchPutRequest(puts=[kv_pb2.PutRequest(key=key, value="v")]),
            kv_pb2.BatchPutResponse,
            True,
        ),
        Call(kv + "Delete", kv_pb2.DeleteRequest(key=key, allow_missing=True), kv_pb2.DeleteResponse, True),
        Call(kv + "List", kv_pb2.ListRequest(prefix=key), kv_pb2.ListResponse, False),
        Call(
            kv + "Watch",
            kv_pb2.WatchRequest(key=key, include_initial_state=True),
            kv_pb2.WatchResponse,
            False,
            stream=True,
        ),
        Call(kv + "Status", kv_pb2.StatusRequest(), kv_pb2.StatusResponse, False),
        Call(compat + "Set", compat_pb2.SetRequest(key=key, value="v"), compat_pb2.SetResponse, True),
        Call(
            compat + "PutKey",
            compat_pb2.PutKeyRequest(key=key, body=httpbody_pb2.HttpBody(data=b"v")),
            compat_pb2.PutKeyResponse,
            True,
        ),
        Call(compat + "Get", compat_pb2.GetRequest(key=key), compat_pb2.GetResponse, False),
        Call(compat + "LocalRead", compat_pb2.LocalReadRequest(key=key), compat_pb2.LocalReadResponse, False),
        Call(compat + "Delete", compat_pb2.DeleteRequest(key=key), compat_pb2.DeleteResponse, True),
        Call(compat + "All", compat_pb2.AllRequest(), httpbody_pb2.HttpBody, False),
        Call(compat + "Health", compat_pb2.HealthRequest(), compat_pb2.HealthResponse, False),
    ]


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


async def invoke(
    channel: grpc.aio.Channel, call: Call, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str]:
    """The status code and details the call ends with (a watch: its first message is enough)."""
    try:
        if call.stream:
            stream = channel.unary_stream(
                call.path, request_serializer=_serialize, response_deserializer=call.response_type.FromString
            )(call.request, metadata=metadata, timeout=_TIMEOUT_S)
            try:
                async for _ in stream:
                    break
            finally:
                stream.cancel()
        else:
            await channel.unary_unary(
                call.path, request_serializer=_serialize, response_deserializer=call.response_type.FromString
            )(call.request, metadata=metadata, timeout=_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def invoke_sync(
    channel: grpc.Channel, call: Call, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str]:
    try:
        if call.stream:
            stream = channel.unary_stream(
                call.path, request_serializer=_serialize, response_deserializer=call.response_type.FromString
            )(call.request, metadata=metadata, timeout=_TIMEOUT_S)
            try:
                next(iter(stream))
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]
        else:
            channel.unary_unary(
                call.path, request_serializer=_serialize, response_deserializer=call.response_type.FromString
            )(call.request, metadata=metadata, timeout=_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Envoy:
    """Envoy (gateway/envoy.yaml via scripts/serve.py) in front of the kv-server on grpc_port."""

    directory: Path
    grpc_port: int
    rest_tls: tuple[Path, Path] | None = None
    upstream_tls: UpstreamTls | None = None
    rate_limit: tuple[int, int] | None = None
    ca: Path | None = None  # verifies the REST listener's certificate
    process: subprocess.Popen[bytes] | None = None
    rest_port: int = 0
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def log(self) -> str:
        return (self.directory / "envoy.log").read_text(errors="replace")

    def start(self, ready_headers: Mapping[str, str]) -> None:
        """Start Envoy; return once GET /v1/status with `ready_headers` is answered by kv-server."""
        assert DESCRIPTOR.exists(), f"{DESCRIPTOR} is missing: make descriptor"
        self.directory.mkdir(parents=True, exist_ok=True)
        config = render_gateway_config(
            self.grpc_port,
            0,
            0,
            self.directory / "envoy.yaml",
            rest_tls=self.rest_tls,
            upstream_tls=self.upstream_tls,
            rate_limit=self.rate_limit,
        )
        if self.rest_tls is not None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca))
        admin_file = self.directory / "envoy-admin-address"
        admin_file.unlink(missing_ok=True)
        command = [*envoy_command(config), "--admin-address-path", str(admin_file)]
        with (self.directory / "envoy.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        for _ in range(600):  # 30 s
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError, http.client.HTTPException):
                if not self.rest_port:
                    admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
                    listeners = _http(admin_port, None, "GET", "/listeners?format=json", None, {}).json()
                    address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
                    self.rest_port = address["port_value"]
                if self.request("GET", "/v1/status", headers=ready_headers, timeout=2.0).status == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Envoy did not become ready; its log:\n{self.log}")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = _TIMEOUT_S,
    ) -> Reply:
        return _http(self.rest_port, self._ssl, method, path, body, dict(headers or {}), timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(_TIMEOUT_S)
        self.process = None


def _http(
    port: int,
    context: ssl.SSLContext | None,
    method: str,
    path: str,
    body: bytes | str | None,
    headers: dict[str, str],
    timeout: float = _TIMEOUT_S,
) -> Reply:
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
        if context is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    )
    try:
        if body is not None:
            headers.setdefault("content-type", "application/json")
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
