"""Benchmark kv against etcd 3.4 on this machine, in one run, with the same load generator.

Both servers are started here on free loopback ports with fresh data directories, preloaded
with the same keys, and driven by h2load with pre-framed gRPC unary bodies:

    get   kv /kv.v1.KeyValue/Get   vs  etcd /etcdserverpb.KV/Range (linearizable)
    put   kv /kv.v1.KeyValue/Put   vs  etcd /etcdserverpb.KV/Put   (durable; one key rewritten)

h2load only sees HTTP: it counts a call as succeeded on HTTP 200 even when grpc-status is not
0. So every measurement is checked three ways: one call with a Python gRPC client on the exact
body before the load; the response bytes h2load received (a failed gRPC call has an empty
body); and for Puts, the store revision must have grown by at least the number of calls counted.
A check that fails makes the run exit with status 1.

Usage (from the repository root, with the project's venv):

    bench/install-deps.sh                      # etcd-server, etcd-client, nghttp2-client, wrk
    .venv/bin/python bench/run.py              # both systems, get and put, sqlite store
    .venv/bin/python bench/run.py --duration 5 --only get --store memory
    .venv/bin/python bench/run.py --systems etcd          # etcd alone

The table goes to stdout, progress to stderr, and the full results to
bench/results/<UTC timestamp>.json. Exit status: 0 all checks passed, 1 a check or a server
failed, 2 a tool is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kv.v1 import kv_pb2, kv_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KV_SERVER = REPO_ROOT / ".venv" / "bin" / "kv-server"
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
KEY_PREFIX = "bench/key/"
PUT_KEY = "bench/put/000000"
OPERATIONS = ("get", "put")
SYSTEMS = ("etcd", "kv")
READY_TIMEOUT_S = 30.0
# Retry connecting every 100-500 ms while a server starts, not grpc's default 1 s to 120 s backoff.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
RPC_TIMEOUT_S = 10.0
# A successful response must bring at least this share of the expected response bytes.
MIN_DATA_SHARE = 0.95


class BenchError(Exception):
    """A server, a tool or a correctness check failed."""


# --------------------------------------------------------------------------- protobuf wire


def varint(value: int) -> bytes:
    """Encode a non-negative int as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def pb_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def pb_varint(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(number << 3) + varint(value)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the varint at data[pos:]; return (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise BenchError("truncated protobuf varint")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return result, pos


def pb_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """Decode one message level into {field number: [values]} (no schema needed)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        else:
            raise BenchError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def pb_first_int(fields: dict[int, list[int | bytes]], number: int) -> int:
    """The first varint value of a field, 0 when absent (proto3 default)."""
    value = fields.get(number, [0])[0]
    return value if isinstance(value, int) else 0


def pb_first_bytes(fields: dict[int, list[int | bytes]], number: int) -> bytes:
    """The first length-delimited value of a field, b"" when absent."""
    value = fields.get(number, [b""])[0]
    return value if isinstance(value, bytes) else b""


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: no compression, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# --------------------------------------------------------------------------- backends


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

    def get_request(self, key: str) -> bytes: ...
    def put_request(self, key: str, value: bytes) -> bytes: ...
    def check_get(self, response: bytes, key: str, value: bytes) -> None: ...
    def revision(self, channel: grpc.Channel) -> int: ...
    def key_count(self, channel: grpc.Channel) -> int: ...


class EtcdBackend:
    """etcd v3 gRPC, with etcdserverpb messages written by hand."""

    name = "etcd"
    get_method = "/etcdserverpb.KV/Range"
    put_method = "/etcdserverpb.KV/Put"

    def get_request(self, key: str) -> bytes:
        return pb_bytes(1, key.encode())  # RangeRequest.key

    def put_request(self, key: str, value: bytes) -> bytes:
        return pb_bytes(1, key.encode()) + pb_bytes(2, value)  # PutRequest.key, .value

    def check_get(self, response: bytes, key: str, value: bytes) -> None:
        kvs = pb_fields(response).get(2, [])  # RangeResponse.kvs
        if len(kvs) != 1 or not isinstance(kvs[0], bytes):
            raise BenchError(f"etcd Range {key!r}: expected 1 key, got {len(kvs)}")
        entry = pb_fields(kvs[0])  # mvccpb.KeyValue: key 1, value 5
        if pb_first_bytes(entry, 1) != key.encode() or pb_first_bytes(entry, 5) != value:
            raise BenchError(f"etcd Range {key!r}: wrong key or value")

    def revision(self, channel: grpc.Channel) -> int:
        response = call_raw(channel, self.get_method, self.get_request(PUT_KEY))
        header = pb_first_bytes(pb_fields(response), 1)  # RangeResponse.header
        return pb_first_int(pb_fields(header), 3)  # ResponseHeader.revision

    def key_count(self, channel: grpc.Channel) -> int:
        end = KEY_PREFIX[:-1] + chr(ord(KEY_PREFIX[-1]) + 1)
        # RangeRequest: key 1, range_end 2, count_only 9; RangeResponse.count is field 4.
        request = pb_bytes(1, KEY_PREFIX.encode()) + pb_bytes(2, end.encode()) + pb_varint(9, 1)
        return pb_first_int(pb_fields(call_raw(channel, self.get_method, request)), 4)


class KvBackend:
    """kv.v1.KeyValue, with the generated messages."""

    name = "kv"
    get_method = "/kv.v1.KeyValue/Get"
    put_method = "/kv.v1.KeyValue/Put"

    def get_request(self, key: str) -> bytes:
        return kv_pb2.GetRequest(key=key).SerializeToString()

    def put_request(self, key: str, value: bytes) -> bytes:
        return kv_pb2.PutRequest(key=key, value_bytes=value).SerializeToString()

    def check_get(self, response: bytes, key: str, value: bytes) -> None:
        entry = kv_pb2.GetResponse.FromString(response).entry
        stored = entry.value.encode() if entry.HasField("value") else entry.value_bytes
        if entry.key != key or stored != value:
            raise BenchError(f"kv Get {key!r}: wrong key or value")

    def revision(self, channel: grpc.Channel) -> int:
        return status(channel).header.revision

    def key_count(self, channel: grpc.Channel) -> int:
        return status(channel).key_count


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


def spawn(name: str, argv: Sequence[str], workdir: Path, port: int) -> Server:
    """Start a server with its output in <workdir>/<name>.log.

    KV_* variables are left out of its environment: the command line alone configures kv.
    """
    log_path = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    log("starting", name, "on", f"127.0.0.1:{port}:", " ".join(argv))
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    return Server(name, proc, f"127.0.0.1:{port}", log_path)


def stop(server: Server) -> None:
    """Stop a server by its PID: SIGTERM, then SIGKILL after 10 s."""
    if server.proc.poll() is not None:
        return
    log("stopping", server.name, "pid", server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)


def start_etcd(etcd_bin: str, workdir: Path) -> Server:
    """A single-member etcd with a fresh data dir on free loopback ports."""
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
    return spawn("etcd", argv, workdir, int(client.rsplit(":", 1)[1]))


def start_kv(cfg: Config) -> Server:
    """The kv server on a free loopback port, on the chosen store, with any --kv-arg flags."""
    port = free_port()
    argv = [cfg.kv_server, "--host", "127.0.0.1", "--port", str(port), "--store", cfg.store]
    if cfg.store == "sqlite":
        argv += ["--store-path", str(cfg.workdir / "kv.db")]
    return spawn("kv", argv + cfg.kv_arg, cfg.workdir, port)


def etcd_ready(channel: grpc.Channel) -> bool:
    """etcd answers a linearizable Range (so it has a leader)."""
    call_raw(channel, EtcdBackend.get_method, EtcdBackend().get_request(PUT_KEY), timeout=1.0)
    return True


def kv_ready(channel: grpc.Channel) -> bool:
    """kv reports SERVING through grpc.health.v1, or answers Status if it has no health service."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        kv_pb2_grpc.KeyValueStub(channel).Status(kv_pb2.StatusRequest(), timeout=1.0)
        return True
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


# --------------------------------------------------------------------------- preload


def bench_key(index: int) -> str:
    """The preloaded key number `index`: bench/key/000001 and so on."""
    return f"{KEY_PREFIX}{index:06d}"


def bench_value(key: str, size: int) -> bytes:
    """A deterministic ASCII value of `size` bytes for a key."""
    return (key.encode() + b"=" + b"v" * size)[-size:]


async def preload_async(address: str, method: str, requests: Sequence[bytes], concurrency: int) -> None:
    """Send every request once, `concurrency` at a time, over one grpc.aio channel."""
    pending = iter(requests)

    async def worker(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        for request in pending:
            await call(request, timeout=RPC_TIMEOUT_S)

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, None, None)
        await asyncio.gather(*(worker(call) for _ in range(concurrency)))


def preload(backend: Backend, server: Server, channel: grpc.Channel, cfg: Config) -> float:
    """Write cfg.keys keys, check that they are all there; return the keys/s achieved."""
    requests = [
        backend.put_request(k, bench_value(k, cfg.value_size)) for k in map(bench_key, range(1, cfg.keys + 1))
    ]
    started = time.monotonic()
    asyncio.run(preload_async(server.address, backend.put_method, requests, cfg.preload_concurrency))
    elapsed = time.monotonic() - started
    count = backend.key_count(channel)
    if count < cfg.keys:
        raise BenchError(f"{backend.name}: preloaded {cfg.keys} keys but the store has {count}")
    log(f"{backend.name}: preloaded {cfg.keys} keys in {elapsed:.1f} s ({cfg.keys / elapsed:.0f}/s)")
    return cfg.keys / elapsed


# --------------------------------------------------------------------------- h2load


@dataclass
class LoadResult:
    """One h2load run, parsed, with the latency percentiles from its per-request log."""

    seconds: float
    requests_per_s: float
    succeeded: int
    failed: int
    errored: int
    non_2xx: int
    data_bytes: int
    mean_ms: float
    max_ms: float
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None


H2LOAD_PATTERNS = {
    "finished": re.compile(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s"),
    "requests": re.compile(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored"
    ),
    "status": re.compile(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx"),
    "traffic": re.compile(r"traffic: .*\((\d+)\) data"),
    "latency": re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)"),
}
SUMMARY_FIGURES = ("requests_per_s", "p50_ms", "p99_ms")
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def to_ms(text: str, unit: str | None = None) -> float:
    """h2load durations ("118us", "22.27ms", "3.00s") in milliseconds."""
    if unit is None:
        match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
        if not match:
            raise BenchError(f"cannot parse h2load duration {text!r}")
        text, unit = match.groups()
    return float(text) * UNIT_MS[unit]


def parse_h2load(output: str) -> LoadResult:
    """The summary h2load prints (it counts HTTP 200 as success, whatever grpc-status says)."""
    found = {name: pattern.search(output) for name, pattern in H2LOAD_PATTERNS.items()}
    missing = [name for name, match in found.items() if match is None]
    if missing:
        raise BenchError(f"h2load output lacks {missing}:\n{output}")
    fin, req, sts, traffic, lat = (m.groups() for m in found.values() if m is not None)
    return LoadResult(
        seconds=to_ms(fin[0], fin[1]) / 1000,
        requests_per_s=float(fin[2]),
        succeeded=int(req[0]),
        failed=int(req[1]),
        errored=int(req[2]),
        non_2xx=sum(int(n) for n in sts),
        data_bytes=int(traffic[0]),
        mean_ms=to_ms(lat[2]),
        max_ms=to_ms(lat[1]),
    )


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None for none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def add_percentiles(result: LoadResult, log_file: Path) -> None:
    """p50/p90/p99 from h2load's per-request log (start us, HTTP status, duration us)."""
    durations = sorted(
        float(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line
    )
    result.p50_ms, result.p90_ms, result.p99_ms = (percentile(durations, p) for p in (50, 90, 99))


def run_h2load(cfg: Config, url: str, body: Path, seconds: float, log_file: Path | None) -> LoadResult:
    """One fixed-duration h2load run of gRPC unary calls with the framed body."""
    argv = [cfg.h2load, "-D", f"{seconds:g}", "-c", str(cfg.concurrency), "-m", str(cfg.streams)]
    argv += ["-t", str(cfg.threads), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv += ["-d", str(body), url]
    if log_file is not None:
        log_file.unlink(missing_ok=True)  # h2load appends to an existing log
        argv.insert(1, f"--log-file={log_file}")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"h2load did not finish within {seconds + 60:g} s") from exc
    if done.returncode != 0:
        raise BenchError(f"h2load exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    result = parse_h2load(done.stdout)
    if log_file is not None:
        add_percentiles(result, log_file)
    return result


# --------------------------------------------------------------------------- scenarios


@dataclass
class Measurement:
    """One operation on one system: the load result and the checks made on it."""

    system: str
    operation: str
    round: int
    key: str
    loadavg_1m: float
    warmup: LoadResult | None
    load: LoadResult
    response_bytes: int
    checks: dict[str, Any] = field(default_factory=dict)


def preflight(
    backend: Backend, channel: grpc.Channel, op: str, request: bytes, key: str, value: bytes
) -> int:
    """Call with the benchmark body from Python; return the framed response size.

    A Put is sent twice: the load rewrites an existing key, whose response can be smaller
    than the one that created it (kv leaves `created: false` out).
    """
    method = backend.get_method if op == "get" else backend.put_method
    try:
        for _ in range(1 if op == "get" else 2):
            response = call_raw(channel, method, request)
    except grpc.RpcError as exc:
        raise BenchError(f"{backend.name} {method} with the benchmark body failed: {exc}") from exc
    if op == "get":
        backend.check_get(response, key, value)
    return len(grpc_frame(response))


def check_load(name: str, result: LoadResult, response_bytes: int) -> dict[str, Any]:
    """Fail unless every call got HTTP 200 and, on average, a full gRPC response body."""
    if result.failed or result.errored or result.non_2xx or not result.succeeded:
        raise BenchError(
            f"{name}: {result.failed} failed, {result.errored} errored, {result.non_2xx} non-2xx"
        )
    share = result.data_bytes / (result.succeeded * response_bytes)
    if share < MIN_DATA_SHARE:
        raise BenchError(
            f"{name}: h2load got {result.data_bytes} response bytes for {result.succeeded} calls, "
            f"expected >= {response_bytes} each: calls failed with a grpc-status (share {share:.2f})"
        )
    return {"response_data_share": round(share, 3)}


def check_puts_landed(
    name: str, backend: Backend, channel: grpc.Channel, before: int, counted: int
) -> dict[str, Any]:
    """Every Put counted by h2load must have moved the store revision by one."""
    landed = backend.revision(channel) - before
    if landed < counted:
        raise BenchError(f"{name}: h2load counted {counted} Puts but the revision grew by {landed}")
    return {"revision_growth": landed, "puts_counted": counted}


def measure(run: Running, op: str, round_no: int, cfg: Config) -> Measurement:
    """Preflight, warm up, measure and check one operation on one system."""
    backend, server, channel = run.backend, run.server, run.channel
    key = bench_key(max(1, cfg.keys // 2)) if op == "get" else PUT_KEY
    value = bench_value(key, cfg.value_size)
    request = backend.get_request(key) if op == "get" else backend.put_request(key, value)
    response_bytes = preflight(backend, channel, op, request, key, value)
    body = cfg.workdir / f"{backend.name}-{op}.grpc"
    body.write_bytes(grpc_frame(request))
    url = f"http://{server.address}{backend.get_method if op == 'get' else backend.put_method}"
    name = f"{backend.name} {op} (round {round_no})"
    loadavg = os.getloadavg()[0]
    before = backend.revision(channel)
    log(f"{name}: warm-up {cfg.warmup:g} s, then {cfg.duration:g} s measured")
    warmup = run_h2load(cfg, url, body, cfg.warmup, None) if cfg.warmup > 0 else None
    load = run_h2load(cfg, url, body, cfg.duration, cfg.workdir / f"{backend.name}-{op}-{round_no}.log")
    checks = check_load(name, load, response_bytes)
    counted = load.succeeded
    if warmup is not None:
        check_load(f"{name} warm-up", warmup, response_bytes)
        counted += warmup.succeeded
    if op == "put":
        checks |= check_puts_landed(name, backend, channel, before, counted)
    log(
        f"{name}: {load.requests_per_s:.0f} req/s, p50 {fmt(load.p50_ms, '{:.2f}')} ms, "
        f"p99 {fmt(load.p99_ms, '{:.2f}')} ms"
    )
    return Measurement(backend.name, op, round_no, key, loadavg, warmup, load, response_bytes, checks)


@dataclass
class Running:
    """A started, ready and preloaded system."""

    backend: Backend
    server: Server
    channel: grpc.Channel
    info: dict[str, Any]


def start_system(name: str, cfg: Config, stack: contextlib.ExitStack) -> Running:
    """Start one system (stopped when `stack` closes), wait until it is ready, preload it."""
    backend: Backend
    if name == "etcd":
        backend, server, probe = EtcdBackend(), start_etcd(cfg.etcd, cfg.workdir), etcd_ready
    else:
        backend, server, probe = KvBackend(), start_kv(cfg), kv_ready
    stack.callback(stop, server)
    channel = stack.enter_context(grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS))
    wait_ready(server, channel, probe)
    info: dict[str, Any] = {
        "address": server.address,
        "preload_keys_per_s": preload(backend, server, channel, cfg),
    }
    if isinstance(backend, KvBackend):
        info |= kv_status_info(channel, cfg.store)
    info["measurements"] = []
    return Running(backend, server, channel, info)


def kv_status_info(channel: grpc.Channel, store: str) -> dict[str, Any]:
    """What the kv server says about itself; its store must be the one asked for."""
    reply = status(channel)
    if reply.store and reply.store != store:
        raise BenchError(f"kv reports store {reply.store!r}, the benchmark asked for {store!r}")
    return {"server_version": reply.server_version, "store": reply.store or store}


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    """Command-line options, resolved."""

    duration: float
    warmup: float
    keys: int
    value_size: int
    concurrency: int
    streams: int
    threads: int
    preload_concurrency: int
    rounds: int
    only: list[str]
    systems: list[str]
    store: str
    etcd: str
    kv_server: str
    kv_arg: list[str]
    h2load: str
    results_dir: Path
    keep: bool
    workdir: Path = Path()


def csv_choice(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of `allowed`."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return [item for item in allowed if item in items]

    return parse


def parse_args(argv: Sequence[str]) -> Config:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run (default 2)")
    p.add_argument("--keys", type=int, default=10_000, help="keys preloaded into each system (default 10000)")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--concurrency", type=int, default=16, help="h2load clients/connections, -c (default 16)")
    p.add_argument("--streams", type=int, default=8, help="h2load streams per connection, -m (default 8)")
    p.add_argument("--threads", type=int, default=1, help="h2load threads, -t (default 1)")
    p.add_argument("--preload-concurrency", type=int, default=64, help="concurrent preload Puts (default 64)")
    p.add_argument("--rounds", type=int, default=1, help="repeat all runs, alternating systems (default 1)")
    p.add_argument(
        "--only", type=csv_choice(OPERATIONS), default=list(OPERATIONS), help="get,put (default both)"
    )
    p.add_argument(
        "--systems", type=csv_choice(SYSTEMS), default=list(SYSTEMS), help="etcd,kv (default both)"
    )
    p.add_argument(
        "--store", choices=("sqlite", "memory"), default="sqlite", help="kv store (default sqlite)"
    )
    p.add_argument("--etcd", default="etcd", help="etcd binary (default: etcd on PATH)")
    p.add_argument("--kv-server", default=str(DEFAULT_KV_SERVER), help="kv server executable")
    p.add_argument(
        "--kv-arg",
        action="append",
        default=[],
        help="extra kv-server flag, repeatable (--kv-arg=--sync=normal)",
    )
    p.add_argument("--h2load", default="h2load", help="h2load binary (default: h2load on PATH)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the work dir (data, logs, bodies)")
    ns = p.parse_args(argv)
    sizes = (ns.duration, ns.keys, ns.value_size, ns.rounds, ns.concurrency, ns.streams, ns.threads)
    if min(sizes) <= 0 or ns.preload_concurrency <= 0 or ns.warmup < 0:
        p.error("sizes, counts and --duration must be positive, --warmup not negative")
    return Config(**vars(ns))


def missing_tools(cfg: Config) -> list[str]:
    """The executables this configuration needs that are not there."""
    needed = [cfg.h2load] + ([cfg.etcd] if "etcd" in cfg.systems else [])
    needed += [cfg.kv_server] if "kv" in cfg.systems else []
    return [tool for tool in needed if shutil.which(tool) is None]


def tool_version(argv: Sequence[str]) -> str:
    """The first line a tool prints for its version, or "" when it cannot say."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]
    return ""


def environment(cfg: Config) -> dict[str, Any]:
    """The machine and tool versions, for the results file."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "etcd": tool_version([cfg.etcd, "--version"]) if "etcd" in cfg.systems else "",
        "h2load": tool_version([cfg.h2load, "--version"]),
    }


# --------------------------------------------------------------------------- report


def median_of(loads: Sequence[dict[str, Any]], key: str) -> float | None:
    """The median of one figure over rounds, None when no round has it."""
    values = [load[key] for load in loads if load[key] is not None]
    return statistics.median(values) if values else None


def summarize(results: dict[str, Any], ops: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per operation and system, the medians over the rounds; and the kv/etcd throughput ratio."""
    summary: dict[str, dict[str, Any]] = {}
    for op in ops:
        row: dict[str, Any] = {}
        for system, info in results.items():
            loads = [m["load"] for m in info["measurements"] if m["operation"] == op]
            row[system] = {"rounds": len(loads)} | {k: median_of(loads, k) for k in SUMMARY_FIGURES}
        if "etcd" in row and "kv" in row:
            row["kv_over_etcd"] = row["kv"]["requests_per_s"] / row["etcd"]["requests_per_s"]
        summary[op] = row
    return summary


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The comparison, one line per operation."""
    head = ("operation", "etcd req/s", "kv req/s", "kv/etcd", "etcd p50", "etcd p99", "kv p50", "kv p99")
    rows: list[tuple[str, ...]] = [head]
    for op, row in summary.items():
        etcd, kv = row.get("etcd", {}), row.get("kv", {})
        ratio = f"{row['kv_over_etcd']:.2f}x" if "kv_over_etcd" in row else "-"
        rates = [fmt(etcd.get("requests_per_s"), "{:.0f}"), fmt(kv.get("requests_per_s"), "{:.0f}")]
        latencies = [fmt(load.get(key), "{:.2f}") for load in (etcd, kv) for key in ("p50_ms", "p99_ms")]
        rows.append((op, *rates, ratio, *latencies))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])
        for row in rows
    ]
    return "\n".join(lines) + "\n(median over rounds; latencies in ms, from h2load's per-request log)"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def write_results(cfg: Config, started: dt.datetime, report: dict[str, Any]) -> Path:
    """bench/results/<UTC timestamp>.json."""
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.results_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- main


def run_all(cfg: Config) -> dict[str, Any]:
    """Start every chosen system, then measure each operation on each system back to back, per round."""
    with contextlib.ExitStack() as stack:
        running = [start_system(name, cfg, stack) for name in cfg.systems]
        for round_no in range(1, cfg.rounds + 1):
            for op in cfg.only:
                for system in running:
                    system.info["measurements"].append(asdict(measure(system, op, round_no, cfg)))
        return {system.backend.name: system.info for system in running}


@contextlib.contextmanager
def work_directory(cfg: Config) -> Iterator[Path]:
    """A temporary directory for data, logs and bodies, removed unless --keep or a failure."""
    path = Path(tempfile.mkdtemp(prefix="kv-bench-"))
    try:
        yield path
    except BaseException:
        log("work dir kept for inspection:", path)
        raise
    if cfg.keep:
        log("work dir kept:", path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stop servers on the way out
    missing = missing_tools(cfg)
    if missing:
        log("missing:", ", ".join(missing), "- run bench/install-deps.sh (and `make setup` for kv-server)")
        return 2
    started = dt.datetime.now(dt.UTC)
    try:
        with work_directory(cfg) as cfg.workdir:
            results = run_all(cfg)
    except BenchError as exc:
        log("FAILED:", exc)
        return 1
    config = {k: v for k, v in asdict(cfg).items() if k != "workdir"}
    summary = summarize(results, cfg.only)
    report = {
        "started": started.isoformat(),
        "config": config,
        "environment": environment(cfg),
        "summary": summary,
        "results": results,
    }
    print(table(summary))
    log("results written to", write_results(cfg, started, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
