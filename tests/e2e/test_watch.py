"""Watch over HTTP: GET or POST /v1/watch answers newline-delimited JSON, one WatchResponse per
line, as events happen, whoever writes them (here: gRPC straight to kv-server). An error after
the stream has started cannot change the HTTP status (200 is sent): it arrives as the `cancel`
message inside the stream, which then ends."""

from __future__ import annotations

import http.client
import json
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.gateway

_MAX_LINES = 200


def read_lines(response: http.client.HTTPResponse, until: int, *, events_only: bool = True) -> list[Any]:
    """Messages from the stream until `until` events (or messages) came; each line one JSON object."""
    messages: list[Any] = []
    seen = 0
    for _ in range(_MAX_LINES):
        line = response.readline()
        assert line, f"the stream ended after {messages}"
        assert line.endswith(b"\n"), line
        message = json.loads(line)
        assert isinstance(message, dict), line
        messages.append(message)
        seen += len(message["events"]) if events_only else 1
        if seen >= until:
            return messages
    raise AssertionError(f"no {until} events in {_MAX_LINES} lines")


def events_of(messages: list[Any]) -> list[Any]:
    return [event for message in messages for event in message["events"]]


def test_live_events_written_over_grpc_arrive_as_json_lines(gateway: Gateway, keyspace: str) -> None:
    path = f"/v1/watch?key={keyspace}&prefix=true&include_previous=true&progress_interval_ms=100"
    with gateway.stream("GET", path) as response:
        assert response.status == 200
        assert response.getheader("content-type") == "application/json"
        assert response.getheader("transfer-encoding") == "chunked"
        progress = read_lines(response, 1, events_only=False)  # the watch is registered
        assert progress[0]["events"] == []
        assert int(progress[0]["header"]["revision"]) >= 0
        first = gateway.put(f"{keyspace}a", b"one")
        gateway.put(f"{keyspace}b", b"\xff\x00")
        gateway.put(f"{keyspace}a", b"two")
        gateway.delete(f"{keyspace}a")
        events = events_of(read_lines(response, 4))
    assert [(e["type"], e["entry"]["key"]) for e in events] == [
        ("TYPE_PUT", f"{keyspace}a"),
        ("TYPE_PUT", f"{keyspace}b"),
        ("TYPE_PUT", f"{keyspace}a"),
        ("TYPE_DELETE", f"{keyspace}a"),
    ]
    assert [int(e["entry"]["mod_revision"]) for e in events] == [first, first + 1, first + 2, first + 3]
    assert events[0]["entry"]["value"] == "one"
    assert events[1]["entry"]["value_bytes"] == "/wA="  # not UTF-8: bytes, base64
    assert events[2]["entry"]["version"] == "2"  # int64 is a JSON string
    assert events[2]["prev_entry"]["value"] == "one"
    assert "prev_entry" not in events[0]  # the key did not exist before


def test_a_watch_resumes_from_start_revision_with_get_and_post(gateway: Gateway, keyspace: str) -> None:
    start = gateway.put(f"{keyspace}x", b"1")
    gateway.put(f"{keyspace}y", b"2")
    gateway.put(f"{keyspace}other-prefix", b"3")
    query = f"/v1/watch?key={keyspace}&prefix=true&start_revision={start}"
    body = json.dumps({"key": keyspace, "prefix": True, "start_revision": str(start)})
    for method, path, request_body in [("GET", query, None), ("POST", "/v1/watch", body)]:
        with gateway.stream(method, path, request_body) as response:
            assert response.status == 200
            events = events_of(read_lines(response, 3))
        assert [e["entry"]["key"] for e in events] == [
            f"{keyspace}x",
            f"{keyspace}y",
            f"{keyspace}other-prefix",
        ]
        assert [int(e["entry"]["mod_revision"]) for e in events] == [start, start + 1, start + 2]


def test_a_watch_with_initial_state_lists_then_follows(gateway: Gateway, keyspace: str) -> None:
    gateway.put(f"{keyspace}1", b"a")
    gateway.put(f"{keyspace}2", b"b")
    path = f"/v1/watch?key={keyspace}&prefix=true&include_initial_state=true"
    with gateway.stream("GET", path) as response:
        messages = read_lines(response, 1, events_only=False)
        assert messages[-1]["initial_state_complete"] is True
        assert [e["key"] for e in messages[-1]["initial_entries"]] == [f"{keyspace}1", f"{keyspace}2"]
        revision = gateway.put(f"{keyspace}3", b"c")
        events = events_of(read_lines(response, 1))
    assert (events[0]["entry"]["key"], int(events[0]["entry"]["mod_revision"])) == (f"{keyspace}3", revision)


def test_a_watch_from_compacted_history_ends_with_the_cancel_message(compacted_gateway: Gateway) -> None:
    gateway = compacted_gateway
    with gateway.stream("GET", "/v1/watch?key=&prefix=true&start_revision=1") as response:
        assert response.status == 200
        lines = response.read().splitlines()  # the server ends the stream: EOF within the timeout
    assert len(lines) == 1, lines
    message = json.loads(lines[0])
    cancel = message["cancel"]
    assert cancel["reason"] == "REASON_COMPACTED"
    assert cancel["resume_revision"] == "1"
    assert int(cancel["compact_revision"]) >= 8
    assert "compacted" in cancel["message"]
    assert message["events"] == []
    # The gateway and the server are fine afterwards.
    assert gateway.get_json("/v1/status")["key_count"] == "12"


def test_the_cancel_names_the_oldest_revision_a_watch_can_start_from(compacted_gateway: Gateway) -> None:
    """kv.proto: WatchCancel.compact_revision and StatusResponse.compact_revision are both the
    oldest revision still deliverable."""
    gateway = compacted_gateway
    oldest = gateway.get_json("/v1/status")["compact_revision"]
    with gateway.stream("GET", "/v1/watch?key=&prefix=true&start_revision=1") as response:
        assert json.loads(response.readline())["cancel"]["compact_revision"] == oldest
    with gateway.stream("GET", f"/v1/watch?key=&prefix=true&start_revision={oldest}") as response:
        message = json.loads(response.readline())
    assert "cancel" not in message
    assert message["events"][0]["entry"]["mod_revision"] == oldest
    with gateway.stream("GET", f"/v1/watch?key=&prefix=true&start_revision={int(oldest) - 1}") as response:
        assert json.loads(response.readline())["cancel"]["reason"] == "REASON_COMPACTED"


def test_a_bad_watch_request_is_a_plain_400_before_the_stream_starts(gateway: Gateway) -> None:
    for path in ("/v1/watch?key=", "/v1/watch?key=a&start_revision=-1", "/v1/watch?key=a&bogus=1"):
        reply = gateway.request("GET", path)
        assert reply.status == 400, (path, reply)
        assert reply.json()["code"] == 3


def test_a_quiet_watch_answers_200_at_once(gateway: Gateway, keyspace: str) -> None:
    with gateway.stream("GET", f"/v1/watch?key={keyspace}quiet", timeout=1.5) as response:
        assert response.status == 200
