"""Prometheus metrics on their own port: call counters and latencies by method and code, the
store's revision, keys and group commits, the cache, open watches; health follows the store."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tests.security.kit import StartServer

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver import server as server_module
from kvserver.domain import StorageFailure
from kvtest import ServerProcess, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str = "OK") -> float:
    labels = {"grpc_service": "kv.v1.KeyValue", "grpc_method": method, "grpc_code": code}
    return value(samples, "kv_grpc_server_handled_total", **labels)


async def test_metrics_move_with_puts_gets_and_watches(start_server: StartServer) -> None:
    port = free_port()
    server = await start_server("sqlite+cache", metrics_port=port)
    before = await asyncio.to_thread(scrape, port)
    assert handled(before, "Put") == 0
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        watch = stub.Watch(kv_pb2.WatchRequest(key="", prefix=True, include_initial_state=True))
        await watch.read()
        await asyncio.gather(*(stub.Put(kv_pb2.PutRequest(key=f"k{i}", value="v")) for i in range(20)))
        for _ in range(2):
            await stub.Get(kv_pb2.GetRequest(key="k1"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Get(kv_pb2.GetRequest(key="absent"))
        during = await asyncio.to_thread(scrape, port)
        watch.cancel()
    assert handled(during, "Put") == 20
    assert handled(during, "Get") == 2
    assert handled(during, "Get", "NOT_FOUND") == 1
    latency = {"grpc_service": "kv.v1.KeyValue", "grpc_method": "Put"}
    assert value(during, "kv_grpc_server_handling_seconds_count", **latency) == 20
    assert value(during, "kv_grpc_server_handling_seconds_sum", **latency) > 0
    # Group commit: 20 concurrent writes in at most 20 transactions, every write in one of them.
    commits = value(during, "kv_store_commit_batch_writes_count")
    assert 1 <= commits <= 20
    assert value(during, "kv_store_commit_batch_writes_sum") == 20
    assert value(during, "kv_store_commit_seconds_count") == commits
    assert value(during, "kv_store_commits_total") == commits
    assert value(during, "kv_store_revision") == 20
    assert value(during, "kv_store_keys") == 20
    assert value(during, "kv_store_file_bytes") > 0
    assert value(during, "kv_cache_hits_total") + value(during, "kv_cache_misses_total") == 3
    assert value(during, "kv_watch_streams_active") == 1
    for _ in range(100):  # the stream's end reaches the server a moment after the cancel
        after = await asyncio.to_thread(scrape, port)
        if value(after, "kv_watch_streams_active") == 0 and handled(after, "Watch", "CANCELLED"):
            break
        await asyncio.sleep(0.05)
    assert value(after, "kv_watch_streams_active") == 0
    assert handled(after, "Watch", "CANCELLED") == 1


def test_the_metrics_port_of_a_server_process(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(tmp_path, "--metrics-port", str(port))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            kv_pb2_grpc.KeyValueStub(channel).Put(kv_pb2.PutRequest(key="a", value="1"), timeout=5)
        samples = scrape(port)
        assert handled(samples, "Put") == 1
        assert value(samples, "kv_store_commit_batch_writes_count") == 1
        assert f"metrics on http://127.0.0.1:{port}/metrics" in server.log()
    finally:
        server.kill()


async def _wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_health_turns_not_serving_while_the_store_fails(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_HEALTH_CHECK_EVERY_S", 0.05)
    server = await start_server("sqlite+cache")
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def is_(expected: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                request = health_pb2.HealthCheckRequest(service="kv.v1.KeyValue")
                try:
                    reply = await health.Check(request, timeout=5)
                except grpc.aio.AioRpcError as error:  # NOT_FOUND until the first check is done
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    return False
                return bool(reply.status == expected)

            return check

        assert await _wait_for(is_(health_pb2.HealthCheckResponse.SERVING))

        async def failing() -> None:
            raise StorageFailure("disk on fire")

        monkeypatch.setattr(server.store, "check", failing)
        assert await _wait_for(is_(health_pb2.HealthCheckResponse.NOT_SERVING))
        monkeypatch.undo()
        assert await _wait_for(is_(health_pb2.HealthCheckResponse.SERVING))
