"""Seed 003 on a cluster: a key written through one node's REST port reads back through every
other node's REST port, with /get (linearizable: at once) and /local_read (the node's own view:
at once today, within a short window once local reads are served by the local etcd member)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.cluster.conftest import ClusterFactory

pytestmark = [pytest.mark.slow, pytest.mark.gateway]

_LOCAL_READ_WINDOW_S = 2.0


def request(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        payload = json.dumps(body) if body is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def local_read_until(port: int, key: str, done: Callable[[int, Any], bool]) -> tuple[int, Any, float]:
    """/local_read until `done(status, body)` (or the window closes): (status, body, seconds)."""
    started = time.monotonic()
    status, body = request(port, "GET", f"/local_read?key={key}")
    for _ in range(200):
        if done(status, body) or time.monotonic() - started > _LOCAL_READ_WINDOW_S:
            break
        time.sleep(0.01)
        status, body = request(port, "GET", f"/local_read?key={key}")
    return status, body, time.monotonic() - started


def test_a_write_through_one_node_reads_back_through_every_other(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(3, gateways=True)
    rest = [ports.rest for ports in cluster.ports]
    for writer, port in enumerate(rest):
        key = f"seed003-{writer}"
        status, body = request(port, "POST", "/set", {"key": key, "value": f"from node {writer + 1}"})
        assert status in (200, 201), body
        assert body["version"] == 1
        expected = (200, {"key": key, "value": f"from node {writer + 1}", "version": 1})
        for reader, other in enumerate(rest):
            if reader == writer:
                continue
            assert request(other, "GET", f"/get?key={key}") == expected, (writer, reader)
            status, body, _ = local_read_until(other, key, lambda *reply, want=expected: reply == want)
            assert (status, body) == expected, (writer, reader)


def test_updates_and_deletes_are_seen_by_every_node(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(3, gateways=True)
    first, second, third = (ports.rest for ports in cluster.ports)
    assert request(first, "POST", "/set", {"key": "shared", "value": "one"})[0] in (200, 201)
    status, body = request(second, "POST", "/set", {"key": "shared", "value": "two"})
    assert (status, body["version"], body["status"]) == (200, 2, "updated")
    for port in (first, second, third):
        assert request(port, "GET", "/get?key=shared") == (
            200,
            {"key": "shared", "value": "two", "version": 2},
        )
    assert request(third, "DELETE", "/delete?key=shared")[0] == 200
    for port in (first, second, third):
        assert request(port, "GET", "/get?key=shared")[0] == 404
        assert local_read_until(port, "shared", lambda status, _: status == 404)[0] == 404
