"""A Python client given every kv server of a cluster keeps working when one of them dies.

The client spreads calls over the servers; after `kill -9` of one, reads never fail (they are
retried on another server), a write that was in flight on the dead server may fail UNAVAILABLE
(it may or may not have been applied, so it is not retried), and after a short while every call
succeeds again. Every acknowledged write is readable afterwards.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from kvclient import Client, KvError, Unavailable

if TYPE_CHECKING:
    from tests.cluster.conftest import ClusterFactory

pytestmark = pytest.mark.slow

_KILL_AT_S = 1.0
_RUN_FOR_S = 5.0
_SETTLE_S = 3.0


def test_a_client_with_several_targets_fails_over(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(3)
    targets = [server.address for server in cluster.servers]
    acknowledged: dict[str, str] = {}
    read_errors: list[KvError] = []
    write_errors: list[tuple[float, KvError]] = []
    served_by: set[str] = set()
    with Client(targets, timeout=5.0) as kv:
        for _ in range(30):
            served_by.add(kv.status().server_id)
        started = time.monotonic()
        killed_at: float | None = None
        for index in range(100_000):
            now = time.monotonic() - started
            if now > _RUN_FOR_S:
                break
            if killed_at is None and now > _KILL_AT_S:
                cluster.kill_server(0)
                killed_at = now
            key, value = f"failover/{index:06d}", f"value {index}"
            try:
                kv.put(key, value)
                acknowledged[key] = value
            except KvError as error:
                write_errors.append((now, error))
            try:
                kv.get(next(iter(acknowledged))) if acknowledged else kv.status()
            except KvError as error:
                read_errors.append(error)
        assert killed_at is not None
        assert len(served_by) == 3, f"calls reached only {served_by}"
        assert read_errors == []
        assert all(isinstance(error, Unavailable) for _, error in write_errors), write_errors
        late = [error for at, error in write_errors if at > killed_at + _SETTLE_S]
        assert late == [], f"writes still failing {_SETTLE_S} s after the kill: {late}"
        assert len(acknowledged) > 100
        stored = {entry.key: entry.text for entry in kv.list("failover/")}
        assert {key: stored.get(key) for key in acknowledged} == acknowledged
    print(f"\nfailover: {len(acknowledged)} writes acknowledged, {len(write_errors)} failed (UNAVAILABLE)")
