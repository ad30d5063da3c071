"""BatchPut through a real gRPC server: results in request order, one revision per applied put,
per-put ABORTED while the others apply, whole-request INVALID_ARGUMENT naming the field with
nothing written, options of Put on every item. Every test runs against each store backend
(memory, sqlite, sqlite with the read cache); the last one runs over a real etcd."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.server import start
from kvtest import EtcdServer, server_config

if TYPE_CHECKING:
    Stub = kv_pb2_grpc.KeyValueAsyncStub

MAX_PUTS = 1000


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return kv_pb2_grpc.KeyValueStub(channel)


def batch(*puts: kv_pb2.PutRequest) -> kv_pb2.BatchPutRequest:
    return kv_pb2.BatchPutRequest(puts=list(puts))


async def revision(stub: Stub) -> int:
    return int((await stub.Status(kv_pb2.StatusRequest())).header.revision)


async def test_results_come_in_request_order_each_with_its_own_revision(stub: Stub) -> None:
    keys = [f"batch/{index:04d}" for index in range(300, 0, -1)]  # not in key order
    response = await stub.BatchPut(batch(*(kv_pb2.PutRequest(key=key, value=key) for key in keys)))
    assert len(response.results) == len(keys)
    assert all(result.WhichOneof("result") == "put" for result in response.results)
    assert [result.put.entry.key for result in response.results] == keys
    revisions = [result.put.header.revision for result in response.results]
    assert revisions == list(range(1, len(keys) + 1))  # applied in the order given
    assert [result.put.entry.mod_revision for result in response.results] == revisions
    assert all(result.put.created for result in response.results)
    assert response.header.revision == len(keys)
    got = await stub.Get(kv_pb2.GetRequest(key=keys[7]))
    assert got.entry.value == keys[7]
    assert got.entry.mod_revision == 8


async def test_a_failed_condition_aborts_only_its_put(stub: Stub) -> None:
    first = await stub.Put(kv_pb2.PutRequest(key="cas", value="v1"))
    response = await stub.BatchPut(
        batch(
            kv_pb2.PutRequest(key="a", value="1"),
            kv_pb2.PutRequest(key="cas", value="lost", if_mod_revision=first.header.revision + 100),
            kv_pb2.PutRequest(key="cas", value="won", if_mod_revision=first.header.revision),
            kv_pb2.PutRequest(key="new", value="x", if_present=True),
            kv_pb2.PutRequest(key="b", value="2"),
        )
    )
    kinds = [result.WhichOneof("result") for result in response.results]
    assert kinds == ["put", "error", "put", "error", "put"]
    aborted = response.results[1].error
    assert aborted.code == grpc.StatusCode.ABORTED.value[0]
    assert "condition failed for key 'cas'" in aborted.message
    assert response.results[3].error.code == grpc.StatusCode.ABORTED.value[0]
    # Only the applied puts took revisions, in request order.
    assert [response.results[i].put.header.revision for i in (0, 2, 4)] == [2, 3, 4]
    assert response.header.revision == 4
    assert (await stub.Get(kv_pb2.GetRequest(key="cas"))).entry.value == "won"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Get(kv_pb2.GetRequest(key="new"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_same_key_twice_applies_in_order(stub: Stub) -> None:
    response = await stub.BatchPut(
        batch(
            kv_pb2.PutRequest(key="twice", value="first"),
            kv_pb2.PutRequest(key="twice", value="second", if_absent=True),
            kv_pb2.PutRequest(key="twice", value="third", if_version=1, return_previous=True),
        )
    )
    assert [result.WhichOneof("result") for result in response.results] == ["put", "error", "put"]
    third = response.results[2].put
    assert not third.created
    assert third.entry.version == 2
    assert third.prev_entry.value == "first"
    assert (await stub.Get(kv_pb2.GetRequest(key="twice"))).entry.value == "third"


async def test_every_put_option_works_per_item(stub: Stub) -> None:
    await stub.Put(kv_pb2.PutRequest(key="old", value="before"))
    response = await stub.BatchPut(
        batch(
            kv_pb2.PutRequest(key="ttl", value="soon", ttl_ms=60_000),
            kv_pb2.PutRequest(key="raw", value_bytes=b"\xff\x00", content_type="application/x-raw"),
            kv_pb2.PutRequest(key="old", value="after", return_previous=True),
            kv_pb2.PutRequest(key="old", value="again"),
            kv_pb2.PutRequest(key="empty"),
        )
    )
    ttl, raw, old, again, empty = (result.put for result in response.results)
    assert ttl.entry.HasField("expire_time")
    assert raw.entry.content_type == "application/x-raw"
    assert not raw.entry.HasField("value_bytes")  # like Put: the entry comes without its value
    assert old.prev_entry.value == "before"
    assert not old.created
    assert not again.HasField("prev_entry")  # only where return_previous was asked
    assert empty.created
    got = await stub.Get(kv_pb2.GetRequest(key="raw"))
    assert got.entry.value_bytes == b"\xff\x00"


@pytest.mark.parametrize(
    ("puts", "field"),
    [
        ([], "puts: must hold at least one put"),
        ([kv_pb2.PutRequest(key=f"k{i}") for i in range(MAX_PUTS + 1)], "puts: 1001 puts is over"),
        ([kv_pb2.PutRequest(key="ok"), kv_pb2.PutRequest(key="")], "puts[1].key: must not be empty"),
        ([kv_pb2.PutRequest(key="ok"), kv_pb2.PutRequest(key="k" * 5000)], "puts[1].key: 5000 bytes"),
        ([kv_pb2.PutRequest(key="a"), kv_pb2.PutRequest(key="b", ttl_ms=-1)], "puts[1].ttl_ms"),
        (
            [
                *(kv_pb2.PutRequest(key=key) for key in "abc"),
                kv_pb2.PutRequest(key="d", if_absent=True, if_present=True),
            ],
            "puts[3].if_absent: contradicts",
        ),
        ([kv_pb2.PutRequest(key="a", if_version=-2)], "puts[0].if_version: must not be negative"),
        ([kv_pb2.PutRequest(key="a", content_type="x" * 300)], "puts[0].content_type"),
    ],
)
async def test_an_invalid_request_fails_whole_naming_the_field_and_writes_nothing(
    stub: Stub, puts: list[kv_pb2.PutRequest], field: str
) -> None:
    before = await revision(stub)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.BatchPut(batch(*puts))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(field)
    assert await revision(stub) == before
    listing = await stub.List(kv_pb2.ListRequest(keys_only=True))
    assert list(listing.entries) == []


async def test_a_full_batch_of_1000_is_accepted(stub: Stub) -> None:
    puts = [kv_pb2.PutRequest(key=f"full/{index:04d}", value="v" * 100) for index in range(MAX_PUTS)]
    response = await stub.BatchPut(batch(*puts))
    assert [result.put.header.revision for result in response.results] == list(range(1, MAX_PUTS + 1))
    status = await stub.Status(kv_pb2.StatusRequest())
    assert status.key_count == MAX_PUTS


async def test_a_batch_is_watched_as_one_event_per_put(stub: Stub) -> None:
    before = await revision(stub)
    await stub.BatchPut(batch(*(kv_pb2.PutRequest(key=f"w/{index}", value="v") for index in range(5))))
    call = stub.Watch(kv_pb2.WatchRequest(key="w/", prefix=True, start_revision=before + 1))
    events: list[kv_pb2.Event] = []
    async for message in call:
        events.extend(message.events)
        if len(events) >= 5:
            break
    call.cancel()
    assert [event.entry.key for event in events] == [f"w/{index}" for index in range(5)]
    assert [event.entry.mod_revision for event in events] == list(range(before + 1, before + 6))


@pytest.fixture
def etcd(tmp_path: Path) -> EtcdServer:
    if not EtcdServer.available():
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    return EtcdServer(tmp_path)


async def test_batch_put_over_the_etcd_store(etcd: EtcdServer, tmp_path: Path) -> None:
    etcd.start()
    try:
        config = replace(server_config(tmp_path, "memory"), store="etcd", etcd_endpoints=etcd.endpoint)
        running = await start(config)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub: Stub = kv_pb2_grpc.KeyValueStub(channel)
                await stub.Put(kv_pb2.PutRequest(key="exists", value="v"))
                puts = [kv_pb2.PutRequest(key=f"e/{index:03d}", value=str(index)) for index in range(50)]
                puts.insert(10, kv_pb2.PutRequest(key="exists", value="no", if_absent=True))
                response = await stub.BatchPut(batch(*puts))
                kinds = [result.WhichOneof("result") for result in response.results]
                assert kinds == ["put"] * 10 + ["error"] + ["put"] * 40
                assert response.results[10].error.code == grpc.StatusCode.ABORTED.value[0]
                revisions = sorted(r.put.header.revision for r in response.results if r.HasField("put"))
                assert revisions == list(range(2, 52))  # one revision per applied put
                assert response.header.revision >= 51
                listing = await stub.List(kv_pb2.ListRequest(prefix="e/", include_count=True))
                assert listing.count == 50
                assert (await stub.Get(kv_pb2.GetRequest(key="exists"))).entry.value == "v"
        finally:
            await running.stop(grace_s=1.0)
    finally:
        etcd.stop()
