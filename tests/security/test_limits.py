"""The limits that protect the server: open watch streams, the server-side deadline of unary
calls, concurrent calls per connection; and the settings that configure them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from tests.security.kit import StartServer

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.cli import load_config
from kvserver.config import Config, WatchSettings
from kvserver.domain import Entry


def _watch(stub: kv_pb2_grpc.KeyValueStub, key: str) -> Any:
    """A watch call (grpc.aio's UnaryStreamCall; the generated stubs are typed for sync grpc)."""
    return stub.Watch(kv_pb2.WatchRequest(key=key, include_initial_state=True))


async def test_watch_streams_beyond_the_limit_are_resource_exhausted(start_server: StartServer) -> None:
    server = await start_server(watch=replace(WatchSettings(), max_streams=2))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        first, second = _watch(stub, "a"), _watch(stub, "b")
        for stream in (first, second):
            assert (await stream.read()).initial_state_complete
        third = _watch(stub, "c")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await third.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == "too many watch streams: the limit is 2"
        # Unary calls are not limited by it.
        await stub.Put(kv_pb2.PutRequest(key="a", value="1"), timeout=5)
        first.cancel()
        for _ in range(200):  # bounded: the hub hears of the cancel a moment later
            if server.hub.active < 2:
                break
            await asyncio.sleep(0.01)
        fourth = _watch(stub, "d")
        assert (await fourth.read()).initial_state_complete
        second.cancel()
        fourth.cancel()


async def test_a_unary_call_past_the_server_deadline_is_deadline_exceeded(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server("sqlite", request_timeout_s=0.2)

    async def slow_get(key: str, now_ms: int, **options: object) -> tuple[int, Entry | None]:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    monkeypatch.setattr(server.store, "get", slow_get)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Get(kv_pb2.GetRequest(key="k"), timeout=10)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "the server's deadline of 0.2 s passed" in (late.value.details() or "")
        assert asyncio.get_running_loop().time() - started < 5
        # Other calls go on.
        assert (await stub.Put(kv_pb2.PutRequest(key="k", value="v"), timeout=5)).created


async def test_calls_beyond_the_concurrent_streams_of_a_connection_wait(start_server: StartServer) -> None:
    server = await start_server(max_concurrent_streams=1)
    async with (
        grpc.aio.insecure_channel(server.address) as busy,
        grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as other,
    ):
        watch = _watch(kv_pb2_grpc.KeyValueStub(busy), "k")
        await watch.read()
        with pytest.raises(grpc.aio.AioRpcError) as waited:
            await kv_pb2_grpc.KeyValueStub(busy).Status(kv_pb2.StatusRequest(), timeout=1)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Another connection is served.
        await kv_pb2_grpc.KeyValueStub(other).Status(kv_pb2.StatusRequest(), timeout=5)
        watch.cancel()


def test_the_new_settings_are_flags_environment_variables_and_config_keys(tmp_path: Path) -> None:
    flags = [
        *("--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"),
        *("--auth-tokens", "tokens.toml", "--max-watch-streams", "7", "--max-concurrent-streams", "9"),
        *("--request-timeout", "2.5", "--metrics-host", "0.0.0.0", "--metrics-port", "9100"),  # noqa: S104
    ]
    expected = replace(
        Config(),
        tls_cert="c.pem",
        tls_key="k.pem",
        tls_client_ca="ca.pem",
        auth_tokens="tokens.toml",
        watch=replace(WatchSettings(), max_streams=7),
        max_concurrent_streams=9,
        request_timeout_s=2.5,
        metrics_host="0.0.0.0",  # noqa: S104
        metrics_port=9100,
    )
    assert load_config(flags, {}) == expected
    environ = {
        "KV_TLS_CERT": "c.pem",
        "KV_TLS_KEY": "k.pem",
        "KV_TLS_CLIENT_CA": "ca.pem",
        "KV_AUTH_TOKENS": "tokens.toml",
        "KV_MAX_WATCH_STREAMS": "7",
        "KV_MAX_CONCURRENT_STREAMS": "9",
        "KV_REQUEST_TIMEOUT": "2.5",
        "KV_METRICS_HOST": "0.0.0.0",  # noqa: S104
        "KV_METRICS_PORT": "9100",
    }
    assert load_config([], environ) == expected
    config_file = tmp_path / "kv.toml"
    config_file.write_text(
        'tls_cert = "c.pem"\ntls_key = "k.pem"\ntls_client_ca = "ca.pem"\nauth_tokens = "tokens.toml"\n'
        'max_concurrent_streams = 9\nrequest_timeout_s = 2.5\nmetrics_host = "0.0.0.0"\n'
        "metrics_port = 9100\n[watch]\nmax_streams = 7\n"
    )
    assert load_config(["--config", str(config_file)], {}) == expected
    defaults = Config()
    assert (defaults.tls_cert, defaults.auth_tokens, defaults.metrics_port) == ("", "", 0)
    assert (defaults.watch.max_streams, defaults.max_concurrent_streams, defaults.request_timeout_s) == (
        1000,
        1000,
        30.0,
    )
