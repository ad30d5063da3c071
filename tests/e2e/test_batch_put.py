"""BatchPut over REST through Envoy: POST /v1/kv:batchPut answers 200 with one result per put
(a failed condition is an `error` element, the others are written), a request that breaks a rule
is a 400 naming the field and writes nothing, and a body over Envoy's limit is a 413."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.gateway

JSON = {"content-type": "application/json"}
PATH = "/v1/kv:batchPut"


def post(gateway: Gateway, puts: list[dict[str, object]]) -> tuple[int, dict[str, object]]:
    reply = gateway.request("POST", PATH, json.dumps({"puts": puts}), JSON)
    assert reply.content_type == "application/json", reply
    return reply.status, reply.json()


def test_results_in_order_with_a_failed_condition_in_place(gateway: Gateway, keyspace: str) -> None:
    gateway.put(f"{keyspace}taken", b"old")
    status, body = post(
        gateway,
        [
            {"key": f"{keyspace}a", "value": "text"},
            {"key": f"{keyspace}taken", "value": "new", "if_absent": True},
            {"key": f"{keyspace}b", "value_bytes": base64.b64encode(b"\x00\xff").decode(), "ttl_ms": 60000},
            {"key": f"{keyspace}a", "value": "again", "return_previous": True},
        ],
    )
    assert status == 200  # per-put errors are in the body; the call itself succeeded
    results = body["results"]
    assert isinstance(results, list)
    assert [sorted(result) for result in results] == [["put"], ["error"], ["put"], ["put"]]
    assert results[1]["error"]["code"] == 10  # ABORTED
    assert "condition failed" in results[1]["error"]["message"]
    assert results[0]["put"]["created"] is True
    assert results[2]["put"]["entry"]["expire_time"]
    assert results[3]["put"]["prev_entry"]["value"] == "text"
    revisions = [int(results[i]["put"]["header"]["revision"]) for i in (0, 2, 3)]
    assert revisions == [revisions[0], revisions[0] + 1, revisions[0] + 2]
    assert int(body["header"]["revision"]) >= revisions[-1]  # type: ignore[index]
    assert gateway.stored(f"{keyspace}a") == b"again"
    assert gateway.stored(f"{keyspace}b") == b"\x00\xff"
    assert gateway.stored(f"{keyspace}taken") == b"old"


@pytest.mark.parametrize(
    ("puts", "message"),
    [
        ([], "puts: must hold at least one put"),
        ([{"key": "ok", "value": "1"}, {"key": "", "value": "2"}], "puts[1].key: must not be empty"),
        ([{"key": "ok", "value": "1"}, {"key": "k", "ttl_ms": "-5"}], "puts[1].ttl_ms: must not be negative"),
        ([{"key": f"k{index}"} for index in range(1001)], "puts: 1001 puts is over the maximum of 1000"),
    ],
)
def test_a_request_that_breaks_a_rule_is_a_400_and_writes_nothing(
    gateway: Gateway, puts: list[dict[str, object]], message: str
) -> None:
    before = gateway.revision()
    status, body = post(gateway, puts)
    assert status == 400
    assert body["code"] == 3
    assert str(body["message"]).startswith(message)
    assert gateway.revision() == before
    assert gateway.stored("ok") is None


def test_a_body_over_envoys_limit_is_a_413(gateway: Gateway, keyspace: str) -> None:
    before = gateway.revision()
    puts = [{"key": f"{keyspace}{index}", "value": "v" * 100_000} for index in range(16)]
    reply = gateway.request("POST", PATH, json.dumps({"puts": puts}), JSON)
    assert reply.status == 413, reply
    assert reply.json()["code"] == 8
    assert gateway.revision() == before
