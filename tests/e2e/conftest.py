"""Fixtures of the end-to-end tests: the real Envoy (gateway/envoy.yaml, rendered by
scripts/serve.py) in front of the real kv-server, both on ephemeral loopback ports.

`gateway` is one pair for the whole session (tests use keys of their own, see `keyspace`);
`start_gateway(*kv_server_flags)` starts a fresh pair for a test that needs an empty store, its
own flags, or to stop the server. Every process started here is stopped here, by PID, in a
`finally`. Requests go through http.client (the path is sent exactly as given) or curl.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for scripts.serve: the gateway config is rendered as `make run` does

from scripts.serve import DESCRIPTOR, envoy_command, render_gateway_config  # noqa: E402

_READY_TIMEOUT_S = 30.0
_REQUEST_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reply:
    """One HTTP response, read in full. Header names are lower case."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass
class Gateway:
    """A running kv-server with Envoy in front of it."""

    directory: Path
    server: ServerProcess
    envoy: subprocess.Popen[bytes] | None = None
    rest_port: int = 0
    admin_port: int = 0
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """host:port of the REST listener."""
        return f"127.0.0.1:{self.rest_port}"

    @property
    def envoy_log(self) -> str:
        return (self.directory / "envoy.log").read_text(errors="replace")

    # ------------------------------------------------------------------ HTTP

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = _REQUEST_TIMEOUT_S,
    ) -> Reply:
        """One request with `path` sent exactly as given (no quoting, no normalisation)."""
        return http_request(self.rest_port, method, path, body, headers, timeout)

    def get_json(self, path: str) -> Any:
        reply = self.request("GET", path)
        assert reply.status == 200, (path, reply)
        return reply.json()

    @contextlib.contextmanager
    def stream(
        self, method: str, path: str, body: bytes | str | None = None, timeout: float = _REQUEST_TIMEOUT_S
    ) -> Iterator[http.client.HTTPResponse]:
        """A request whose response is read as it arrives (a watch); closed on exit."""
        connection = http.client.HTTPConnection("127.0.0.1", self.rest_port, timeout=timeout)
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            try:
                yield response
            finally:
                response.close()
        finally:
            connection.close()

    def curl(self, *args: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """curl with these arguments; returns (HTTP status, body)."""
        done = subprocess.run(  # noqa: S603
            ["curl", "-sS", *args, "-w", "\n%{http_code}"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, (args, done.stderr.decode(errors="replace"))
        body, _, status = done.stdout.rpartition(b"\n")
        return int(status), body

    def admin(self, path: str) -> Reply:
        return http_request(self.admin_port, "GET", path, None, None, _REQUEST_TIMEOUT_S)

    # ------------------------------------------------------------------ gRPC, straight to kv-server

    @property
    def stub(self) -> kv_pb2_grpc.KeyValueStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.server.address)
        return kv_pb2_grpc.KeyValueStub(self._channel)

    def stored(self, key: str) -> bytes | None:
        """The value kv-server holds for `key` (read over gRPC), None when absent."""
        try:
            entry = self.stub.Get(kv_pb2.GetRequest(key=key), timeout=_REQUEST_TIMEOUT_S).entry
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return entry.value.encode() if entry.HasField("value") else entry.value_bytes

    def put(self, key: str, value: bytes) -> int:
        """Write over gRPC; returns the revision."""
        request = kv_pb2.PutRequest(key=key, value_bytes=value)
        return self.stub.Put(request, timeout=_REQUEST_TIMEOUT_S).header.revision

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.stub.Delete(kv_pb2.DeleteRequest(key=key, allow_missing=True), timeout=_REQUEST_TIMEOUT_S)

    def revision(self) -> int:
        return self.stub.Status(kv_pb2.StatusRequest(), timeout=_REQUEST_TIMEOUT_S).header.revision

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start kv-server, then Envoy pointed at it; return once REST answers /health."""
        self.server.start()
        config = render_gateway_config(self.server.port, 0, 0, self.directory / "envoy.yaml")
        admin_file = self.directory / "envoy-admin-address"
        admin_file.unlink(missing_ok=True)
        command = [*envoy_command(config), "--admin-address-path", str(admin_file)]
        with (self.directory / "envoy.log").open("ab") as log:
            self.envoy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for _ in range(int(_READY_TIMEOUT_S / 0.05)):
            if self.envoy.poll() is not None:
                break
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                if not self.rest_port:
                    self.admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
                    listeners = self.admin("/listeners?format=json").json()["listener_statuses"]
                    self.rest_port = listeners[0]["local_address"]["socket_address"]["port_value"]
                if self.request("GET", "/health", timeout=2.0).status == 200:
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the gateway did not become ready; Envoy's log:\n{self.envoy_log}")

    def stop(self) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL) and kill kv-server, by PID."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.envoy is not None:
            if self.envoy.poll() is None:
                self.envoy.send_signal(signal.SIGTERM)
                try:
                    self.envoy.wait(_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.envoy.kill()
                    self.envoy.wait(_STOP_TIMEOUT_S)
            self.envoy = None
        self.server.kill()


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None,
    headers: Mapping[str, str] | None,
    timeout: float,
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        with response:
            data = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


@contextlib.contextmanager
def running_gateway(directory: Path, *server_args: str) -> Iterator[Gateway]:
    directory.mkdir(parents=True, exist_ok=True)
    gateway = Gateway(directory, ServerProcess(directory, *server_args))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()


StartGateway = Callable[..., Gateway]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One kv-server + Envoy for the session, over SQLite."""
    assert DESCRIPTOR.exists(), f"{DESCRIPTOR} is missing: run `make descriptor`"
    with running_gateway(tmp_path_factory.mktemp("gateway")) as running:
        yield running


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """`start_gateway(*kv_server_flags)`: a fresh kv-server + Envoy, stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def start(*server_args: str) -> Gateway:
            directory = tmp_path / f"gateway-{uuid.uuid4().hex[:8]}"
            return stack.enter_context(running_gateway(directory, *server_args))

        yield start


@pytest.fixture(scope="module")
def compacted_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose server keeps 5 events of history, after 12 writes (k0..k11) and the
    retention pass (every 5 s) that discards the older ones."""
    with running_gateway(tmp_path_factory.mktemp("compacted"), "--history-max-events", "5") as running:
        for index in range(12):
            running.put(f"k{index}", b"v")
        for _ in range(200):
            if int(running.get_json("/v1/status")["compact_revision"]) >= 8:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("history was not compacted within 20 s")
        yield running


@pytest.fixture
def keyspace() -> str:
    """A key prefix no other test uses, so tests can share the session gateway."""
    return f"e2e-{uuid.uuid4().hex[:10]}/"
