"""Fixtures of the cluster tests: real etcd members, kv servers (`--store etcd`) and Envoy gateways
on free loopback ports, started by scripts/cluster.py's LocalCluster in the test's temporary
directory. Every process started here is stopped here, by PID, in a `finally`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from kv.v1 import kv_pb2_grpc
from kvtest import free_port

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for scripts.cluster

from scripts.cluster import BIN, FrontPorts, LocalCluster, NodePorts  # noqa: E402
from scripts.serve import DESCRIPTOR  # noqa: E402


def free_ports(nodes: int) -> list[NodePorts]:
    chosen: set[int] = set()

    def one() -> int:
        for _ in range(100):
            port = free_port()
            if port not in chosen:
                chosen.add(port)
                return port
        raise RuntimeError("no free port")

    return [NodePorts(one(), one(), one(), one(), one()) for _ in range(nodes)]


ClusterFactory = Callable[..., LocalCluster]
if TYPE_CHECKING:
    Stub = kv_pb2_grpc.KeyValueAsyncStub
    StubsFactory = Callable[[LocalCluster], list[Stub]]


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    """`factory(nodes=3, gateways=False, members_only=False)` starts a cluster; all are stopped
    at the end of the test."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run `make cluster-deps` (Debian etcd-server, etcd-client)")
    started: list[LocalCluster] = []

    def factory(nodes: int = 3, *, gateways: bool = False, members_only: bool = False) -> LocalCluster:
        if gateways and (not (BIN / "envoy").exists() or not DESCRIPTOR.exists()):
            pytest.fail("the REST gateway needs envoy in the venv and build/kv.pb: run `make descriptor`")
        cluster = LocalCluster(tmp_path / f"cluster-{len(started) + 1}", free_ports(nodes), gateways=gateways)
        started.append(cluster)
        if members_only:
            cluster.start_members()
        else:
            cluster.start()
        return cluster

    try:
        yield factory
    finally:
        for cluster in started:
            cluster.stop()


@pytest.fixture
async def stubs_factory() -> AsyncIterator[StubsFactory]:
    """gRPC stubs for every kv server of a cluster (channels closed at the end)."""
    channels: list[grpc.aio.Channel] = []

    def factory(cluster: LocalCluster) -> list[Stub]:
        stubs: list[Stub] = []
        for server in cluster.servers:
            channel = grpc.aio.insecure_channel(server.address)
            channels.append(channel)
            stubs.append(kv_pb2_grpc.KeyValueStub(channel))
        return stubs

    try:
        yield factory
    finally:
        for channel in channels:
            await channel.close(None)


@pytest.fixture
def front_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A 3-node cluster without per-node gateways, with the front gateway over its kv servers
    (`cluster.front_proxy`, default health-check settings); stopped at the end of the test."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run `make cluster-deps` (Debian etcd-server, etcd-client)")
    if not (BIN / "envoy").exists() or not DESCRIPTOR.exists():
        pytest.fail("the front gateway needs envoy in the venv and build/kv.pb: run `make descriptor`")
    ports = free_ports(3)
    taken = {port for node in ports for port in vars(node).values()}
    front = list(dict.fromkeys(port for port in (free_port() for _ in range(20)) if port not in taken))
    assert len(front) >= 2, "no free port for the front gateway"
    cluster = LocalCluster(tmp_path / "cluster", ports, gateways=False, front=FrontPorts(front[0], front[1]))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
