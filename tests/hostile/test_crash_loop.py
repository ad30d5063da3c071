"""Kill -9 in a loop: concurrent writes, SIGKILL mid-stream, restart on the same SQLite file.

After every restart, every write acknowledged in any cycle so far must be there with the value
and revision it was acknowledged with, no two acknowledged writes may share a revision, and the
store's revision must not have gone back; while the server is down, `PRAGMA integrity_check`
must say "ok". KV_CRASH_CYCLES sets the number of cycles (default 50, about a minute).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import ServerProcess

CYCLES = int(os.environ.get("KV_CRASH_CYCLES", "50"))
WRITERS = 8
BURST_S = (0.2, 0.4)
PUT_TIMEOUT_S = 5.0
MAX_WRITES_PER_WRITER = 100_000


def value_of(key: str) -> str:
    return f"value of {key}"


async def write_until_killed(server: ServerProcess, cycle: int, burst_s: float) -> dict[str, int]:
    """Concurrent Puts of fresh keys, SIGKILL after `burst_s` with Puts in flight; returns the
    revision of every acknowledged Put."""
    acknowledged: dict[str, int] = {}
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)

        async def writer(number: int) -> None:
            for index in range(MAX_WRITES_PER_WRITER):
                key = f"c{cycle:04d}/w{number}/{index:06d}"
                try:
                    response = await stub.Put(
                        kv_pb2.PutRequest(key=key, value=value_of(key)), timeout=PUT_TIMEOUT_S
                    )
                except grpc.aio.AioRpcError:
                    return
                acknowledged[key] = response.header.revision

        writers = [asyncio.create_task(writer(number)) for number in range(WRITERS)]
        await asyncio.sleep(burst_s)
        in_flight = sum(1 for task in writers if not task.done())
        server.kill()
        async with asyncio.timeout(30):
            await asyncio.gather(*writers)
    assert in_flight == WRITERS, f"cycle {cycle}: only {in_flight} writers were still writing at the kill"
    return acknowledged


async def stored_entries(server: ServerProcess) -> tuple[int, dict[str, kv_pb2.Entry]]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        revision = (await stub.Status(kv_pb2.StatusRequest(), timeout=10)).header.revision
        stored: dict[str, kv_pb2.Entry] = {}
        token = ""
        for _ in range(100_000):
            page = await stub.List(kv_pb2.ListRequest(page_size=1000, page_token=token), timeout=30)
            stored.update((entry.key, entry) for entry in page.entries)
            token = page.next_page_token
            if not token:
                return revision, stored
    raise AssertionError("the listing did not end")


async def assert_all_present(server: ServerProcess, acknowledged: dict[str, int], last_revision: int) -> int:
    revision, stored = await stored_entries(server)
    missing = [key for key in acknowledged if key not in stored]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {sorted(missing)[:5]}"
    wrong = [
        (key, revision, stored[key].mod_revision, stored[key].value)
        for key, revision in acknowledged.items()
        if stored[key].mod_revision != revision or stored[key].value != value_of(key)
    ]
    assert not wrong, f"{len(wrong)} acknowledged writes changed, e.g. {wrong[:5]}"
    assert revision >= last_revision, f"the revision went back from {last_revision} to {revision}"
    return revision


def start_again(server: ServerProcess) -> None:
    """Start on the same file (and port); another port if a process took this one meanwhile."""
    try:
        server.start()
    except RuntimeError:
        if "address already in use" not in server.log().lower():
            raise
        server.port = 0
        server.start()


def integrity_check(path: Path) -> str:
    """PRAGMA integrity_check through a read-only connection: it leaves the write-ahead log for
    the server's own recovery instead of checkpointing it on close."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


@pytest.mark.slow
async def test_acknowledged_writes_survive_a_kill_9_loop(tmp_path: Path) -> None:
    rng = random.Random(7)
    server = ServerProcess(tmp_path, "--sync", "full")
    acknowledged: dict[str, int] = {}
    revision = 0
    started = time.monotonic()
    per_cycle: list[int] = []
    try:
        for cycle in range(CYCLES):
            start_again(server)
            revision = await assert_all_present(server, acknowledged, revision)
            written = await write_until_killed(server, cycle, rng.uniform(*BURST_S))
            assert written, f"cycle {cycle}: no write was acknowledged before the kill"
            per_cycle.append(len(written))
            acknowledged.update(written)
            revisions = list(acknowledged.values())
            assert len(set(revisions)) == len(revisions), "two acknowledged writes share a revision"
            assert integrity_check(server.db_path) == "ok", f"cycle {cycle}: integrity check failed"
        start_again(server)
        await assert_all_present(server, acknowledged, revision)
        assert server.stop() == 0
        assert integrity_check(server.db_path) == "ok"
    finally:
        server.kill()
    elapsed = time.monotonic() - started
    print(
        f"\n{CYCLES} kill -9 cycles in {elapsed:.1f} s: {len(acknowledged)} acknowledged writes"
        f" ({min(per_cycle)}..{max(per_cycle)} per cycle), all present with their revisions"
    )
