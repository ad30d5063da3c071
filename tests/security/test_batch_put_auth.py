"""BatchPut under bearer tokens: a write permission on every key of the batch is needed; one key
outside a token's prefix, or a read-only token, refuses the whole call with PERMISSION_DENIED and
writes nothing; no token is UNAUTHENTICATED. Metrics count the call like any other RPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from tests.security.kit import TOKENS, StartServer

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.api.auth import PERMISSION_DENIED_MESSAGE, RULES, UNAUTHENTICATED_MESSAGE
from kvserver.server import RunningServer

ADMIN, READER, TEAM = (TOKENS[name] for name in ("admin", "reader", "team"))


@pytest.fixture
async def server(start_server: StartServer, tokens_file: Path) -> RunningServer:
    return await start_server(auth_tokens=str(tokens_file))


def batch(*keys: str) -> kv_pb2.BatchPutRequest:
    return kv_pb2.BatchPutRequest(puts=[kv_pb2.PutRequest(key=key, value="v") for key in keys])


def test_batch_put_has_a_write_rule() -> None:
    rule = RULES["/kv.v1.KeyValue/BatchPut"]
    assert rule.write
    assert rule.request_type is kv_pb2.BatchPutRequest


async def test_a_token_needs_write_access_to_every_key_of_the_batch(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        allowed = await stub.BatchPut(batch("team/a", "team/b"), metadata=TEAM.metadata)
        assert [result.put.entry.key for result in allowed.results] == ["team/a", "team/b"]
        revision = server.store.revision
        refused = [
            (batch("team/c", "other/x", "team/d"), TEAM.metadata, grpc.StatusCode.PERMISSION_DENIED),
            (batch("team/c"), READER.metadata, grpc.StatusCode.PERMISSION_DENIED),
            (batch("team/c"), (), grpc.StatusCode.UNAUTHENTICATED),
        ]
        for request, metadata, code in refused:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.BatchPut(request, metadata=metadata)
            assert error.value.code() == code
            expected = PERMISSION_DENIED_MESSAGE if code == grpc.StatusCode.PERMISSION_DENIED else None
            assert error.value.details() == (expected or UNAUTHENTICATED_MESSAGE)
        assert server.store.revision == revision  # nothing of a refused batch was written
        done = await stub.BatchPut(batch("other/x", "team/c"), metadata=ADMIN.metadata)
        assert len(done.results) == 2
