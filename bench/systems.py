"""The two systems under test: how to talk to them (raw gRPC bytes) and how to run them.

kv is spoken to with its generated messages, etcd with messages written by hand (bench.wire),
so both go through the same generic gRPC calls and the same pre-framed h2load bodies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from bench.wire import (
    BenchError,
    pb_bytes,
    pb_fields,
    pb_first_bytes,
    pb_first_int,
    pb_varint,
    prefix_end,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kv.v1 import kv_pb2, kv_pb2_grpc

KEY_PREFIX = "bench/key/"
PUT_KEY = "bench/put/0000000"
WATCH_PREFIX = "bench/watch/"
SYSTEMS = ("etcd", "kv")
READY_TIMEOUT_S = 30.0
# Retry connecting every 100-500 ms while a server starts, not grpc's default 1 s to 120 s backoff.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
RPC_TIMEOUT_S = 10.0


def bench_key(index: int) -> str:
    """The preloaded key number `index`: bench/key/0000001 and so on (room for 9,999,999)."""
    return f"{KEY_PREFIX}{index:07d}"


def bench_value(key: str, size: int) -> bytes:
    """A deterministic ASCII value of `size` bytes for a key."""
    return (key.encode() + b"=" + b"v" * size)[-size:]


def call_raw(channel: grpc.Channel, method: str, request: bytes, timeout: float = RPC_TIMEOUT_S) -> bytes:
    """One unary call with raw bytes in and out, through a generic method handle."""
    response = channel.unary_unary(method, None, None)(request, timeout=timeout)
    if not isinstance(response, bytes):
        raise BenchError(f"{method}: unexpected response type {type(response).__name__}")
    return response


class Backend(Protocol):
    """What the harness needs to know about one system under test."""

    name: str
    get_method: str
    put_method: str
    list_method: str
    watch_method: str

    # Many puts in one call (bulk load with --batch): kv's BatchPut, etcd's Txn.
    batch_put_method: str
    max_batch: int  # the most puts one call may carry on the system's default settings

    def get_request(self, key: str) -> bytes: ...
    def put_request(self, key: str, value: bytes) -> bytes: ...
    def batch_put_request(self, items: Sequence[tuple[str, bytes]]) -> bytes: ...
    def check_batch_put(self, response: bytes, count: int) -> int:
        """The number of puts of the call that were not applied (0 when all were)."""
        ...

    def list_request(self, prefix: str, limit: int) -> bytes: ...
    def watch_request(self, prefix: str) -> bytes: ...
    def check_get(self, response: bytes, key: str, value: bytes) -> None: ...
    def list_entries(self, response: bytes) -> int: ...
    def revision(self, channel: grpc.Channel) -> int: ...
    def key_count(self, channel: grpc.Channel) -> int: ...


class EtcdBackend:
    """etcd v3 gRPC (etcdserverpb), messages written by hand."""

    name = "etcd"
    get_method = "/etcdserverpb.KV/Range"
    put_method = "/etcdserverpb.KV/Put"
    list_method = "/etcdserverpb.KV/Range"
    watch_method = "/etcdserverpb.Watch/Watch"
    batch_put_method = "/etcdserverpb.KV/Txn"
    # etcd's --max-txn-ops default: a Txn with more operations is refused.
    max_batch = 128

    def get_request(self, key: str) -> bytes:
        return pb_bytes(1, key.encode())  # RangeRequest.key (linearizable: etcd's default)

    def put_request(self, key: str, value: bytes) -> bytes:
        return pb_bytes(1, key.encode()) + pb_bytes(2, value)  # PutRequest.key, .value

    def batch_put_request(self, items: Sequence[tuple[str, bytes]]) -> bytes:
        # TxnRequest.success (2): RequestOp.request_put (2) per put; no compares, so it succeeds.
        return b"".join(pb_bytes(2, pb_bytes(2, self.put_request(key, value))) for key, value in items)

    def check_batch_put(self, response: bytes, count: int) -> int:
        fields = pb_fields(response)  # TxnResponse: succeeded 2, responses 3
        if pb_first_int(fields, 2) != 1 or len(fields.get(3, [])) != count:
            return count  # a Txn is atomic: all or nothing
        return 0

    def list_request(self, prefix: str, limit: int) -> bytes:
        # RangeRequest: key 1, range_end 2, limit 3 (keys in byte order, as kv's List).
        return pb_bytes(1, prefix.encode()) + pb_bytes(2, prefix_end(prefix).encode()) + pb_varint(3, limit)

    def watch_request(self, prefix: str) -> bytes:
        # WatchRequest.create_request (1): WatchCreateRequest key 1, range_end 2.
        create = pb_bytes(1, prefix.encode()) + pb_bytes(2, prefix_end(prefix).encode())
        return pb_bytes(1, create)

    def check_get(self, response: bytes, key: str, value: bytes) -> None:
        kvs = pb_fields(response).get(2, [])  # RangeResponse.kvs
        if len(kvs) != 1 or not isinstance(kvs[0], bytes):
            raise BenchError(f"etcd Range {key!r}: expected 1 key, got {len(kvs)}")
        entry = pb_fields(kvs[0])  # mvccpb.KeyValue: key 1, value 5
        if pb_first_bytes(entry, 1) != key.encode() or pb_first_bytes(entry, 5) != value:
            raise BenchError(f"etcd Range {key!r}: wrong key or value")

    def list_entries(self, response: bytes) -> int:
        return len(pb_fields(response).get(2, []))

    def revision(self, channel: grpc.Channel) -> int:
        response = call_raw(channel, self.get_method, self.get_request(PUT_KEY))
        header = pb_first_bytes(pb_fields(response), 1)  # RangeResponse.header
        return pb_first_int(pb_fields(header), 3)  # ResponseHeader.revision

    def key_count(self, channel: grpc.Channel) -> int:
        # A count-only Range over the preloaded keys; RangeResponse.count is field 4.
        request = pb_bytes(1, KEY_PREFIX.encode()) + pb_bytes(2, prefix_end(KEY_PREFIX).encode())
        return pb_first_int(pb_fields(call_raw(channel, self.get_method, request + pb_varint(9, 1))), 4)


class KvBackend:
    """kv.v1.KeyValue, with the generated messages."""

    name = "kv"
    get_method = "/kv.v1.KeyValue/Get"
    put_method = "/kv.v1.KeyValue/Put"
    list_method = "/kv.v1.KeyValue/List"
    watch_method = "/kv.v1.KeyValue/Watch"
    batch_put_method = "/kv.v1.KeyValue/BatchPut"
    max_batch = 1000  # BatchPut's maximum (the contract)

    def get_request(self, key: str) -> bytes:
        return kv_pb2.GetRequest(key=key).SerializeToString()

    def put_request(self, key: str, value: bytes) -> bytes:
        return kv_pb2.PutRequest(key=key, value_bytes=value).SerializeToString()

    def batch_put_request(self, items: Sequence[tuple[str, bytes]]) -> bytes:
        puts = [kv_pb2.PutRequest(key=key, value_bytes=value) for key, value in items]
        return kv_pb2.BatchPutRequest(puts=puts).SerializeToString()

    def check_batch_put(self, response: bytes, count: int) -> int:
        results = kv_pb2.BatchPutResponse.FromString(response).results
        if len(results) != count:
            return count
        return sum(1 for result in results if result.HasField("error"))

    def list_request(self, prefix: str, limit: int) -> bytes:
        return kv_pb2.ListRequest(prefix=prefix, page_size=limit).SerializeToString()

    def watch_request(self, prefix: str) -> bytes:
        return kv_pb2.WatchRequest(key=prefix, prefix=True).SerializeToString()

    def check_get(self, response: bytes, key: str, value: bytes) -> None:
        entry = kv_pb2.GetResponse.FromString(response).entry
        stored = entry.value.encode() if entry.HasField("value") else entry.value_bytes
        if entry.key != key or stored != value:
            raise BenchError(f"kv Get {key!r}: wrong key or value")

    def list_entries(self, response: bytes) -> int:
        return len(kv_pb2.ListResponse.FromString(response).entries)

    def revision(self, channel: grpc.Channel) -> int:
        return status(channel).header.revision

    def key_count(self, channel: grpc.Channel) -> int:
        return status(channel).key_count


def backend_for(name: str) -> Backend:
    backend: Backend = EtcdBackend() if name == "etcd" else KvBackend()
    return backend


def status(channel: grpc.Channel) -> kv_pb2.StatusResponse:
    """The kv Status RPC."""
    stub = kv_pb2_grpc.KeyValueStub(channel)
    return stub.Status(kv_pb2.StatusRequest(), timeout=RPC_TIMEOUT_S)


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    """A server process started by this harness."""

    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(name: str, argv: Sequence[str], workdir: Path, address: str) -> Server:
    """Start a server with its output in <workdir>/<name>.log.

    KV_* variables are left out of its environment: the command line alone configures kv.
    """
    log_path = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    log("starting", name, "on", f"{address}:", " ".join(argv))
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    return Server(name, proc, address, log_path)


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """Stop a process this harness started, by its PID: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    log("stopping", name, "pid", proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def start_etcd(etcd_bin: str, workdir: Path) -> Server:
    """A single-member etcd with a fresh data dir on free loopback ports, default settings."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    argv = [
        etcd_bin,
        "--name=default",
        f"--data-dir={workdir / 'etcd-data'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--log-level=warn",
    ]
    return spawn("etcd", argv, workdir, client.removeprefix("http://"))


def start_kv(kv_server: str, store: str, workdir: Path, extra: Sequence[str]) -> Server:
    """The kv server on a free loopback port, on the chosen store, with any extra flags."""
    port = free_port()
    argv = [kv_server, "--host", "127.0.0.1", "--port", str(port), "--store", store]
    if store == "sqlite":
        argv += ["--store-path", str(workdir / "kv.db")]
    return spawn("kv", [*argv, *extra], workdir, f"127.0.0.1:{port}")


def etcd_ready(channel: grpc.Channel) -> bool:
    """etcd answers a linearizable Range (so it has a leader)."""
    call_raw(channel, EtcdBackend.get_method, EtcdBackend().get_request(PUT_KEY), timeout=1.0)
    return True


def kv_ready(channel: grpc.Channel) -> bool:
    """kv reports SERVING through grpc.health.v1."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_ready(server: Server, channel: grpc.Channel, probe: Callable[[grpc.Channel], bool]) -> None:
    """Poll the probe until it passes; fail if the process exits or 30 s pass."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for _ in range(int(READY_TIMEOUT_S / 0.1)):
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(grpc.RpcError):
            if probe(channel):
                log(server.name, "ready at", server.address)
                return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise BenchError(f"{server.name} not ready after {READY_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process (all its threads) has used; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)
