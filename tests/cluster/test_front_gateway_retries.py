"""What the front gateway retries (scripts/serve.py, render_gateway_config with `upstreams`): the
real Envoy in front of three fake kv servers in this process, one that answers, one that fails
every call with UNAVAILABLE after it has reached it, and a port where nothing listens.

Reads, gRPC and REST, are retried on another server whatever the failure: every one succeeds.
Writes are retried only when they never reached a server (the connection failed): each write
reaches exactly one server, so one that reached the failing server fails with UNAVAILABLE
(503 over REST) instead of being sent again, where it might be applied twice.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from kv.compat.v1 import compat_pb2
from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import free_port

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.serve import BIN, DESCRIPTOR, envoy_command, render_gateway_config  # noqa: E402

pytestmark = pytest.mark.gateway

_TIMEOUT_S = 5.0
_START_TIMEOUT_S = 20.0
_REQUESTS = 30


class Upstream:
    """A fake kv server: counts the calls it receives; `failing` ones end in UNAVAILABLE."""

    def __init__(self, failing: bool) -> None:
        self.failing = failing
        self.calls: Counter[str] = Counter()
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "kv.v1.KeyValue",
                    {
                        "Get": self._handler("Get", kv_pb2.GetRequest, self._get),
                        "Put": self._handler("Put", kv_pb2.PutRequest, lambda _: kv_pb2.PutResponse()),
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "kv.compat.v1.CompatService",
                    {
                        "Get": self._handler("compat Get", compat_pb2.GetRequest, self._compat_get),
                        "Set": self._handler("compat Set", compat_pb2.SetRequest, self._compat_set),
                    },
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _handler(
        self, name: str, request_type: type[Message], answer: Callable[[Any], Message]
    ) -> grpc.RpcMethodHandler[Any, Message]:
        def handle(request: Any, context: grpc.ServicerContext) -> Message:
            self.calls[name] += 1
            if self.failing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake: unavailable")
            return answer(request)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=request_type.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )

    @staticmethod
    def _get(request: kv_pb2.GetRequest) -> Message:
        return kv_pb2.GetResponse(entry=kv_pb2.Entry(key=request.key))

    @staticmethod
    def _compat_get(request: compat_pb2.GetRequest) -> Message:
        return compat_pb2.GetResponse(key=request.key, value="v", version=1)

    @staticmethod
    def _compat_set(request: compat_pb2.SetRequest) -> Message:
        return compat_pb2.SetResponse(key=request.key, value=request.value, version=1, status="created")


def admin(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def rest(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=_TIMEOUT_S)
    try:
        payload = json.dumps(body) if body is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, int, Upstream, Upstream]]:
    """(REST/gRPC port, admin port, the good upstream, the failing one) of an Envoy balancing
    over the good upstream, the failing one and a port where nothing listens."""
    if not (BIN / "envoy").exists() or not DESCRIPTOR.exists():
        pytest.fail("the gateway needs envoy in the venv and build/kv.pb: run `make descriptor`")
    good, failing = Upstream(failing=False), Upstream(failing=True)
    nothing = free_port()
    rest_port, admin_port = free_port(), free_port()
    config = render_gateway_config(
        good.port,
        rest_port,
        admin_port,
        tmp_path / "envoy.yaml",
        upstreams=[failing.port, nothing, good.port],
        rate_limit=(0, 0),
    )
    process: subprocess.Popen[bytes] | None = None
    good.server.start()
    failing.server.start()
    try:
        with (tmp_path / "envoy.log").open("wb") as log:
            process = subprocess.Popen(envoy_command(config), stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + _START_TIMEOUT_S
        for _ in range(int(_START_TIMEOUT_S / 0.05)):
            try:
                if admin(admin_port, "/ready")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Envoy did not start: " + (tmp_path / "envoy.log").read_text())
            time.sleep(0.05)
        yield rest_port, admin_port, good, failing
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(_TIMEOUT_S)
        good.server.stop(None)
        failing.server.stop(None)


def test_reads_are_retried_and_writes_only_when_they_reached_no_server(
    gateway: tuple[int, int, Upstream, Upstream],
) -> None:
    rest_port, admin_port, good, failing = gateway
    put_failures: Counter[str] = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{rest_port}") as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        for n in range(_REQUESTS):
            assert stub.Get(kv_pb2.GetRequest(key=f"k{n}"), timeout=_TIMEOUT_S).entry.key == f"k{n}"
        for n in range(_REQUESTS):
            try:
                stub.Put(kv_pb2.PutRequest(key=f"k{n}", value="v"), timeout=_TIMEOUT_S)
            except grpc.RpcError as error:
                put_failures[error.code().name] += 1
    rest_reads = Counter(rest(rest_port, "GET", f"/get?key=k{n}") for n in range(_REQUESTS))
    rest_writes = Counter(
        rest(rest_port, "POST", "/set", {"key": f"k{n}", "value": "v"}) for n in range(_REQUESTS)
    )

    # Reads: every one succeeded, some of them on a second or third attempt.
    assert failing.calls["Get"] > 0
    assert failing.calls["compat Get"] > 0
    assert rest_reads == Counter({200: _REQUESTS})
    # Writes: each reached one server exactly once; those that reached the failing one failed.
    assert good.calls["Put"] + failing.calls["Put"] == _REQUESTS
    assert put_failures == Counter({"UNAVAILABLE": failing.calls["Put"]}), put_failures
    assert failing.calls["Put"] > 0
    assert good.calls["Put"] > 0
    assert good.calls["compat Set"] + failing.calls["compat Set"] == _REQUESTS
    assert rest_writes == Counter({200: good.calls["compat Set"], 503: failing.calls["compat Set"]})
    # The port where nothing listens got requests (round robin), each retried elsewhere.
    stats = dict(
        line.split(": ", 1)
        for line in admin(admin_port, "/stats")[1].splitlines()
        if line.startswith("cluster.kv_grpc.upstream_")
    )
    assert int(stats["cluster.kv_grpc.upstream_cx_connect_fail"]) > 0
    assert int(stats["cluster.kv_grpc.upstream_rq_retry_success"]) > 0
