"""Acknowledged writes survive a clean restart and a kill -9, in every sync mode that claims it."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import ServerProcess

WRITERS = 16
KILL_AFTER_S = 1.0


async def write_until_killed(address: str) -> dict[str, int]:
    """Concurrent Puts until the server dies; returns each acknowledged key's revision."""
    acknowledged: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)

        async def writer(number: int) -> None:
            for index in range(100_000):
                key = f"w{number:02d}/{index:06d}"
                try:
                    response = await stub.Put(kv_pb2.PutRequest(key=key, value=f"value {index}"), timeout=5)
                except grpc.aio.AioRpcError:
                    return
                acknowledged[key] = response.header.revision

        async with asyncio.timeout(60):
            await asyncio.gather(*(writer(number) for number in range(WRITERS)))
    return acknowledged


async def assert_all_present(address: str, acknowledged: dict[str, int]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        stored: dict[str, kv_pb2.Entry] = {}
        token = ""
        for _ in range(10_000):
            page = await stub.List(kv_pb2.ListRequest(page_size=1000, page_token=token), timeout=10)
            stored.update((entry.key, entry) for entry in page.entries)
            token = page.next_page_token
            if not token:
                break
        missing = [key for key in acknowledged if key not in stored]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        for key, revision in acknowledged.items():
            assert stored[key].mod_revision == revision
            assert stored[key].value == f"value {int(key.split('/')[1])}"
        status = await stub.Status(kv_pb2.StatusRequest(), timeout=5)
        assert status.header.revision >= max(acknowledged.values())
        # The history was written in the same transactions: it replays every acknowledged write.
        replayed: set[str] = set()
        call = stub.Watch(kv_pb2.WatchRequest(key="w", prefix=True, start_revision=1), timeout=30)
        async for message in call:
            replayed.update(event.entry.key for event in message.events)
            if message.header.revision >= status.header.revision and not message.events:
                break
            if len(replayed) >= len(stored):
                break
        call.cancel()
        assert set(acknowledged) <= replayed


def integrity_check(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_acknowledged_writes_survive_kill_9(tmp_path: Path, sync: str) -> None:
    server = ServerProcess(tmp_path, "--sync", sync)
    server.start()
    try:
        writes = asyncio.create_task(write_until_killed(server.address))
        await asyncio.sleep(KILL_AFTER_S)
        server.kill()
        acknowledged = await writes
        assert len(acknowledged) > 100, "the writers barely ran before the kill"
        assert integrity_check(server.db_path) == "ok"
        server.start()
        await assert_all_present(server.address, acknowledged)
    finally:
        server.kill()


@pytest.mark.slow
async def test_data_revisions_and_history_survive_a_clean_restart(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = kv_pb2_grpc.KeyValueStub(channel)
            for index in range(20):
                await stub.Put(kv_pb2.PutRequest(key=f"k{index}", value_bytes=bytes([index, 255])), timeout=5)
            await stub.Delete(kv_pb2.DeleteRequest(key="k0"), timeout=5)
        assert server.stop() == 0
        assert "stopped" in server.log()
        server.start()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = kv_pb2_grpc.KeyValueStub(channel)
            entry = (await stub.Get(kv_pb2.GetRequest(key="k7"), timeout=5)).entry
            assert (entry.value_bytes, entry.mod_revision, entry.version) == (bytes([7, 255]), 8, 1)
            put = await stub.Put(kv_pb2.PutRequest(key="k7", value="after"), timeout=5)
            assert put.header.revision == 22
            call = stub.Watch(kv_pb2.WatchRequest(key="k", prefix=True, start_revision=20), timeout=10)
            revisions: list[int] = []
            async for message in call:
                revisions += [event.entry.mod_revision for event in message.events]
                if len(revisions) >= 3:
                    break
            call.cancel()
            assert revisions == [20, 21, 22]
    finally:
        server.kill()


@pytest.mark.slow
async def test_sigterm_drains_health_watches_and_exits_cleanly(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = kv_pb2_grpc.KeyValueStub(channel)
            call = stub.Watch(kv_pb2.WatchRequest(key="", prefix=True), timeout=20)
            await stub.Put(kv_pb2.PutRequest(key="a", value="1"), timeout=5)
            first = await call.read()
            assert isinstance(first, kv_pb2.WatchResponse)
            assert [event.entry.key for event in first.events] == ["a"]
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            last = await call.read()
            assert isinstance(last, kv_pb2.WatchResponse)
            assert last.cancel.reason == kv_pb2.WatchCancel.REASON_SHUTDOWN
            assert last.cancel.resume_revision == 2
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(20) == 0
        server.process = None
    finally:
        server.kill()
