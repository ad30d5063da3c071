"""grpcurl against a real `kv-server` process: reflection, JSON in and out for every RPC, a
streaming Watch and the health service. grpcurl prints proto field names and int64 as strings."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import BIN, ServerProcess

GRPCURL = str(BIN / "grpcurl")
TIMEOUT_S = 20.0


def grpcurl(
    server: ServerProcess,
    *args: str,
    data: object = None,
    options: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext [options] [-d JSON] ADDRESS args...`"""
    command = [GRPCURL, "-plaintext", *options]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [server.address, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)  # noqa: S603
    if check:
        assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def call(server: ServerProcess, method: str, data: object) -> Any:
    """One unary call with a JSON request; its JSON response."""
    return json.loads(grpcurl(server, f"kv.v1.KeyValue/{method}", data=data).stdout)


def json_objects(text: str) -> list[Any]:
    """The JSON objects grpcurl printed one after another (one per stream message)."""
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    position = 0
    for _ in range(10_000):
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return objects
        parsed, position = decoder.raw_decode(text, position)
        objects.append(parsed)
    raise AssertionError("too many objects")


def test_list_shows_the_services(kv_server: ServerProcess) -> None:
    services = grpcurl(kv_server, "list").stdout.split()
    for name in (
        "kv.v1.KeyValue",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        assert name in services
    methods = grpcurl(kv_server, "list", "kv.v1.KeyValue").stdout.split()
    for method in ("Get", "Put", "Delete", "List", "Watch", "Status"):
        assert f"kv.v1.KeyValue.{method}" in methods


def test_describe_the_service_and_its_messages(kv_server: ServerProcess) -> None:
    service = grpcurl(kv_server, "describe", "kv.v1.KeyValue").stdout
    assert "kv.v1.KeyValue is a service:" in service
    assert "rpc Watch ( .kv.v1.WatchRequest ) returns ( stream .kv.v1.WatchResponse )" in service
    for method in ("Get", "Put", "Delete", "List", "Status"):
        assert f"rpc {method} ( .kv.v1.{method}Request ) returns ( .kv.v1.{method}Response )" in service
    put_request = grpcurl(kv_server, "describe", "kv.v1.PutRequest").stdout
    assert "kv.v1.PutRequest is a message:" in put_request
    for field in ("string key = 1;", "int64 ttl_ms = 4;", "bool if_absent = 5;", "bytes value_bytes = 3;"):
        assert field in put_request
    cancel = grpcurl(kv_server, "describe", "kv.v1.WatchCancel.Reason").stdout
    assert "REASON_SLOW_CONSUMER = 2;" in cancel


def test_every_rpc_with_json(kv_server: ServerProcess) -> None:
    created = call(kv_server, "Put", {"key": "greeting", "value": "hello"})
    assert created == {
        "header": {"revision": "1"},
        "created": True,
        "entry": {"key": "greeting", "create_revision": "1", "mod_revision": "1", "version": "1"},
    }
    replaced = call(kv_server, "Put", {"key": "greeting", "value": "hello again", "return_previous": True})
    assert replaced["header"] == {"revision": "2"}
    assert "created" not in replaced  # false is left out of JSON
    assert replaced["entry"]["version"] == "2"
    assert replaced["prev_entry"]["value"] == "hello"
    assert call(kv_server, "Put", {"key": "g/binary", "value_bytes": "/wA="})["header"] == {"revision": "3"}
    expiring = call(kv_server, "Put", {"key": "g/ttl", "value": "soon", "ttl_ms": "600000"})
    assert expiring["entry"]["expire_time"].endswith("Z")

    assert call(kv_server, "Get", {"key": "greeting"}) == {
        "header": {"revision": "4"},
        "entry": {
            "key": "greeting",
            "value": "hello again",
            "create_revision": "1",
            "mod_revision": "2",
            "version": "2",
        },
    }
    assert call(kv_server, "Get", {"key": "g/binary"})["entry"]["value_bytes"] == "/wA="

    listing = call(kv_server, "List", {})
    assert listing["header"] == {"revision": "4"}
    assert [entry["key"] for entry in listing["entries"]] == ["g/binary", "g/ttl", "greeting"]
    assert "next_page_token" not in listing
    first = call(
        kv_server, "List", {"prefix": "g/", "page_size": 1, "include_count": True, "keys_only": True}
    )
    assert first["count"] == "2"
    assert first["entries"] == [
        {"key": "g/binary", "create_revision": "3", "mod_revision": "3", "version": "1"}
    ]
    second = call(
        kv_server,
        "List",
        {"prefix": "g/", "page_size": 1, "keys_only": True, "page_token": first["next_page_token"]},
    )
    assert [entry["key"] for entry in second["entries"]] == ["g/ttl"]

    status = call(kv_server, "Status", {})
    assert status["header"] == {"revision": "4"}
    assert status["store"] == "sqlite"
    assert status["key_count"] == "3"
    assert status["limits"] == {
        "max_key_bytes": "4096",
        "max_value_bytes": "1048576",
        "default_page_size": 100,
        "max_page_size": 1000,
        "default_progress_interval_ms": "5000",
    }
    assert status["server_version"]
    assert str(kv_server.port) in status["server_id"]
    assert status["started_time"].endswith("Z")

    deleted = call(kv_server, "Delete", {"key": "g/", "prefix": True, "return_previous": True})
    assert deleted["header"] == {"revision": "6"}
    assert deleted["deleted"] == "2"
    assert [entry["key"] for entry in deleted["prev_entries"]] == ["g/binary", "g/ttl"]
    assert call(kv_server, "Delete", {"key": "greeting"}) == {"header": {"revision": "7"}, "deleted": "1"}

    watched = grpcurl(
        kv_server,
        "kv.v1.KeyValue/Watch",
        data={"key": "greeting", "start_revision": 1},
        options=["-max-time", "2"],
        check=False,
    )
    assert "DeadlineExceeded" in watched.stderr
    history = json_objects(watched.stdout)
    events = [event for message in history for event in message.get("events", [])]
    assert [(event["type"], event["entry"]["mod_revision"]) for event in events] == [
        ("TYPE_PUT", "1"),
        ("TYPE_PUT", "2"),
        ("TYPE_DELETE", "7"),
    ]


@pytest.mark.parametrize(
    ("method", "data", "code", "text"),
    [
        ("Get", {"key": "missing"}, "NotFound", "missing"),
        ("Put", {"key": "", "value": "v"}, "InvalidArgument", "key"),
        ("Put", {"key": "k", "ttl_ms": "-5"}, "InvalidArgument", "ttl_ms"),
        ("List", {"page_size": 1001}, "InvalidArgument", "page_size"),
        ("Delete", {"key": "missing"}, "NotFound", "missing"),
    ],
)
def test_errors_through_grpcurl(
    kv_server: ServerProcess, method: str, data: object, code: str, text: str
) -> None:
    result = grpcurl(kv_server, f"kv.v1.KeyValue/{method}", data=data, check=False)
    assert result.returncode != 0
    assert f"Code: {code}" in result.stderr
    assert text in result.stderr


def test_watch_prints_an_event_put_while_it_runs(kv_server: ServerProcess) -> None:
    with grpc.insecure_channel(kv_server.address) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        stub.Put(kv_pb2.PutRequest(key="other", value="before"), timeout=TIMEOUT_S)
        # Starting at the next revision makes the event certain even if the Put below reaches
        # the server before the watch does.
        start = stub.Status(kv_pb2.StatusRequest(), timeout=TIMEOUT_S).header.revision + 1
        request = json.dumps(
            {"key": "watched/", "prefix": True, "start_revision": start, "include_previous": True}
        )
        watch = subprocess.Popen(  # noqa: S603
            [
                GRPCURL,
                "-plaintext",
                "-max-time",
                "3",
                "-d",
                request,
                kv_server.address,
                "kv.v1.KeyValue/Watch",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(0.5)
            first = stub.Put(kv_pb2.PutRequest(key="watched/a", value="one"), timeout=TIMEOUT_S)
            stub.Put(kv_pb2.PutRequest(key="unwatched", value="x"), timeout=TIMEOUT_S)
            second = stub.Put(kv_pb2.PutRequest(key="watched/a", value="two"), timeout=TIMEOUT_S)
            stdout, stderr = watch.communicate(timeout=TIMEOUT_S)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(5)
    assert "DeadlineExceeded" in stderr  # -max-time ended the stream
    events = [event for message in json_objects(stdout) for event in message.get("events", [])]
    assert events == [
        {
            "type": "TYPE_PUT",
            "entry": {
                "key": "watched/a",
                "value": "one",
                "create_revision": str(first.header.revision),
                "mod_revision": str(first.header.revision),
                "version": "1",
            },
        },
        {
            "type": "TYPE_PUT",
            "entry": {
                "key": "watched/a",
                "value": "two",
                "create_revision": str(first.header.revision),
                "mod_revision": str(second.header.revision),
                "version": "2",
            },
            "prev_entry": {
                "key": "watched/a",
                "value": "one",
                "create_revision": str(first.header.revision),
                "mod_revision": str(first.header.revision),
                "version": "1",
            },
        },
    ]


def test_health_check_is_serving(kv_server: ServerProcess) -> None:
    for service in ("", "kv.v1.KeyValue"):
        result = grpcurl(kv_server, "grpc.health.v1.Health/Check", data={"service": service})
        assert json.loads(result.stdout) == {"status": "SERVING"}
