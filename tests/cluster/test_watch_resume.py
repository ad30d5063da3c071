"""A watch on one kv server, resumed on another from the last revision seen, delivers every event
exactly once, in order, whichever server made the change."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from kv.v1 import kv_pb2

if TYPE_CHECKING:
    from tests.cluster.conftest import ClusterFactory, Stub, StubsFactory

pytestmark = pytest.mark.slow

PREFIX = "resume/"
WRITES = 300
_TIMEOUT_S = 10.0


async def write(stubs: list[Stub], written: list[int]) -> None:
    """WRITES puts (some replacing earlier keys, some deletes) alternately through `stubs`."""
    for index in range(WRITES):
        stub = stubs[index % len(stubs)]
        key = f"{PREFIX}{index % 40:02d}"
        if index % 7 == 6:
            request = kv_pb2.DeleteRequest(key=key, allow_missing=True)
            deleted = await stub.Delete(request, timeout=_TIMEOUT_S)
            if deleted.deleted:
                written.append(int(deleted.header.revision))
        else:
            put = await stub.Put(kv_pb2.PutRequest(key=key, value=f"v{index}"), timeout=_TIMEOUT_S)
            written.append(int(put.header.revision))


def watch_from(revision: int) -> kv_pb2.WatchRequest:
    return kv_pb2.WatchRequest(key=PREFIX, prefix=True, start_revision=revision, progress_interval_ms=200)


async def test_a_watch_resumed_on_another_server_delivers_every_event_once(
    cluster_factory: ClusterFactory, stubs_factory: StubsFactory
) -> None:
    cluster = cluster_factory(3)
    first, second, third = stubs_factory(cluster)
    start = int((await first.Status(kv_pb2.StatusRequest(), timeout=_TIMEOUT_S)).header.revision) + 1
    written: list[int] = []
    delivered: list[int] = []
    writer = asyncio.create_task(write([second, third], written))
    try:
        # Watch on the first server until a third of the writes have arrived, then kill it.
        resume_from = start
        call = first.Watch(watch_from(start))
        try:
            for _ in range(10_000):
                message = await asyncio.wait_for(call.read(), _TIMEOUT_S)
                assert isinstance(message, kv_pb2.WatchResponse), "the stream ended"
                delivered += [int(event.entry.mod_revision) for event in message.events]
                # Every event up to the header revision has been delivered.
                resume_from = int(message.header.revision) + 1
                if len(delivered) >= WRITES // 3:
                    break
        finally:
            await asyncio.to_thread(cluster.kill_server, 0)
            call.cancel()
        # Resume on the second server from there, while the writes go on, until all are seen.
        call = second.Watch(watch_from(resume_from))
        try:
            for _ in range(10_000):
                if writer.done() and delivered and max(delivered) >= max(written):
                    break
                message = await asyncio.wait_for(call.read(), _TIMEOUT_S)
                assert isinstance(message, kv_pb2.WatchResponse), "the stream ended"
                delivered += [int(event.entry.mod_revision) for event in message.events]
        finally:
            call.cancel()
    finally:
        await writer
    assert len(written) > WRITES * 0.8
    assert delivered == sorted(written), "events lost, repeated or out of order across the resume"
