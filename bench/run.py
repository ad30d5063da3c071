"""Benchmark kv against etcd 3.4 on this machine, in one run, with the same load generators.

Both servers start here on free loopback ports with fresh data directories (kv: `kv-server
--store sqlite`, durable, its defaults; etcd: one member, its defaults), get the same keys, and
are measured back to back, one system after the other for each measurement:

    get      kv Get                   vs etcd Range of one key (linearizable)   h2load, saturated
    ceiling  the same Get answered by an empty grpc.aio handler (bench/ceiling_server.py):
             the most any Python gRPC server serves here, measured like kv's Get
    put      kv Put (durable)         vs etcd Put                               h2load, saturated
    list     kv List page_size=100    vs etcd Range over the prefix, limit 100  h2load, saturated
    rest     kv GET /v1/kv/{key} through Envoy, and etcd's JSON gateway         wrk
    sweep    get and put at fixed rates (h2load --rps): latency against throughput, the PNG;
             and both at 1,000/s evenly paced (a Python client: h2load's --rps comes in bursts)
    watch    1,000 streams on one prefix, one writer at 100 and 1,000 writes/s: delivery latency
    bulk     the store grows from --keys to --big-keys keys by batches of puts (kv BatchPut,
             etcd Txn), and by concurrent single Puts for the first share: keys/s
    scale    get and put at --keys and at --big-keys keys: h2load on one key, and a Python
             client on uniformly random keys (h2load sends one fixed body)

h2load counts a call as succeeded on HTTP 200 even when grpc-status is not 0, so every h2load
run is checked: the exact body is first sent once with a Python gRPC client; the response bytes
h2load received must be those of full responses; Puts must have moved the store revision by at
least the number h2load counted. wrk runs must be all 2xx with full bodies; watch streams must
each see every write once, in order. A failed check makes the run exit with status 1.

Usage (from the repository root, with the project's venv):

    bench/install-deps.sh                      # etcd, h2load, wrk; matplotlib and py-spy in the venv
    .venv/bin/python bench/run.py              # everything (about 9 minutes); updates docs/benchmarks.md
    .venv/bin/python bench/run.py --quick      # a smoke run: a few seconds per measurement
    .venv/bin/python bench/run.py --only get,put,sweep --no-docs
    .venv/bin/python bench/run.py --profile    # py-spy profiles of kv-server during its runs

The tables go to stdout, progress to stderr, everything to bench/results/<UTC time>.json and
.md; the figures (unless --quick or --no-docs) into docs/benchmarks.md between its result
markers, with the plot in docs/benchmarks-latency.png. Exit status: 0 all checks passed,
1 a check or a server failed, 2 a tool is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/run.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from bench import loadgen, profile, report, rest
from bench.h2load import LoadResult, Shape, check_load, run_h2load
from bench.plot import Point, plot_latency
from bench.systems import (
    CHANNEL_OPTIONS,
    KEY_PREFIX,
    PUT_KEY,
    SYSTEMS,
    Backend,
    Server,
    backend_for,
    bench_key,
    bench_value,
    call_raw,
    cpu_seconds,
    etcd_ready,
    free_port,
    kv_ready,
    log,
    spawn,
    start_etcd,
    start_kv,
    status,
    stop,
    wait_ready,
)
from bench.watch_fanout import FanoutPlan, run_fanout
from bench.wire import BenchError, grpc_frame

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KV_SERVER = REPO_ROOT / ".venv" / "bin" / "kv-server"
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
PLOT = REPO_ROOT / "docs" / "benchmarks-latency.png"
SCENARIOS = ("get", "ceiling", "put", "list", "rest", "sweep", "watch", "bulk", "scale")
LIST_PAGE = 100
# A rate above this share of the system's saturated throughput is not swept: the saturated run
# is the last point of its curve.
SWEEP_MAX_SHARE = 0.9
PACED_RATE = 1000.0


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    """Command-line options, resolved."""

    duration: float
    warmup: float
    keys: int
    big_keys: int
    value_size: int
    concurrency: int
    streams: int
    threads: int
    sweep_rates: list[float]
    sweep_seconds: float
    rest_connections: int
    watch_streams: int
    watch_rates: list[float]
    watch_seconds: float
    watch_drain: float
    bulk_processes: int
    bulk_concurrency: int
    bulk_batch: int
    single_concurrency: int
    single_keys: int
    random_concurrency: int
    random_seconds: float
    only: list[str]
    systems: list[str]
    store: str
    etcd: str
    kv_server: str
    kv_arg: list[str]
    h2load: str
    wrk: str
    results_dir: Path
    docs: bool
    profile: bool
    keep: bool
    quick: bool
    argv: list[str] = field(default_factory=list)
    workdir: Path = Path()


QUICK = {
    "duration": 2.0,
    "warmup": 0.5,
    "keys": 2_000,
    "big_keys": 20_000,
    "sweep_rates": [500.0, 1000.0, 4000.0],
    "sweep_seconds": 1.5,
    "watch_streams": 200,
    "watch_seconds": 1.5,
    "watch_drain": 5.0,
    "random_seconds": 1.5,
    "single_keys": 4_000,
}


def csv_choice(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of `allowed`."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return [item for item in allowed if item in items]

    return parse


def csv_floats(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("a comma-separated list of positive numbers")
    return values


def parse_args(argv: Sequence[str]) -> Config:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--quick", action="store_true", help="smoke run: small sizes, a few seconds per measurement")
    add("--only", type=csv_choice(SCENARIOS), default=list(SCENARIOS), help=",".join(SCENARIOS))
    add("--systems", type=csv_choice(SYSTEMS), default=list(SYSTEMS), help="etcd,kv (default both)")
    add("--duration", type=float, default=5.0, help="measured seconds of saturated h2load runs (5)")
    add("--warmup", type=float, default=2.0, help="warm-up seconds before each saturated run (2)")
    add("--keys", type=int, default=10_000, help="keys preloaded (10000)")
    add("--big-keys", type=int, default=1_000_000, help="keys after the bulk load (1000000)")
    add("--value-size", type=int, default=100, help="value bytes (100)")
    add("--concurrency", type=int, default=16, help="saturated h2load -c (16)")
    add("--streams", type=int, default=8, help="saturated h2load -m (8)")
    add("--threads", type=int, default=1, help="h2load -t (1)")
    add("--sweep-rates", type=csv_floats, default=[250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0])
    add("--sweep-seconds", type=float, default=3.0, help="seconds per fixed-rate run (3)")
    add("--rest-connections", type=int, default=64, help="wrk -c (64)")
    add("--watch-streams", type=int, default=1000, help="watch streams (1000)")
    add("--watch-rates", type=csv_floats, default=[100.0, 1000.0], help="writes/s (100,1000)")
    add("--watch-seconds", type=float, default=5.0, help="measured seconds of writes (5)")
    add("--watch-drain", type=float, default=10.0, help="seconds a late delivery may take (10)")
    add("--bulk-processes", type=int, default=2, help="bulk load client processes (2)")
    add("--bulk-concurrency", type=int, default=2, help="batch calls in flight per bulk process (2)")
    add(
        "--bulk-batch", type=int, default=1000, help="puts per bulk call: kv BatchPut, etcd Txn <= 128 (1000)"
    )
    add("--single-concurrency", type=int, default=128, help="single Puts in flight per process (128)")
    add(
        "--single-keys", type=int, default=20_000, help="keys of the bulk load written by single Puts (20000)"
    )
    add("--random-concurrency", type=int, default=64, help="calls in flight, random-key client (64)")
    add("--random-seconds", type=float, default=3.0, help="measured seconds, random-key client (3)")
    add("--store", choices=("sqlite", "memory"), default="sqlite", help="kv store (sqlite)")
    add("--etcd", default="etcd", help="etcd binary (etcd on PATH)")
    add("--kv-server", default=str(DEFAULT_KV_SERVER), help="kv server executable")
    add(
        "--kv-arg",
        action="append",
        default=[],
        help="extra kv-server flag, repeatable (--kv-arg=--sync=normal)",
    )
    add("--h2load", default="h2load", help="h2load binary")
    add("--wrk", default="wrk", help="wrk binary")
    add("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where the JSON and .md go")
    add("--no-docs", dest="docs", action="store_false", help="leave docs/benchmarks.md and the PNG alone")
    add(
        "--profile", action="store_true", help="py-spy record kv-server during its get, put, bulk, watch runs"
    )
    add("--keep", action="store_true", help="keep the work dir (data, logs, bodies, per-request logs)")
    ns = p.parse_args(argv)
    values = vars(ns)
    if ns.quick:
        given = {
            arg.split("=")[0].removeprefix("--").replace("-", "_") for arg in argv if arg.startswith("--")
        }
        values |= {k: v for k, v in QUICK.items() if k not in given}
        values["docs"] = False  # a smoke run never rewrites docs/benchmarks.md
    sizes = [ns.duration, ns.keys, ns.value_size, ns.concurrency, ns.streams, ns.threads, ns.watch_streams]
    sizes += [ns.bulk_processes, ns.bulk_concurrency, ns.random_concurrency, ns.rest_connections]
    sizes += [ns.bulk_batch, ns.single_concurrency]
    if min(sizes) <= 0 or min(ns.warmup, values["single_keys"]) < 0 or values["big_keys"] < values["keys"]:
        p.error("sizes and durations must be positive, --warmup not negative, --big-keys >= --keys")
    if values["keys"] < LIST_PAGE:
        p.error(f"--keys must be at least {LIST_PAGE} (the List page)")
    return Config(**values, argv=list(argv))


# --------------------------------------------------------------------------- systems


@dataclass
class Running:
    """A started, ready and preloaded system."""

    backend: Backend
    server: Server
    channel: grpc.Channel
    keys: int  # keys bench/key/0000001.. present
    info: dict[str, Any]


def start_system(name: str, cfg: Config, stack: contextlib.ExitStack) -> Running:
    """Start one system (stopped when `stack` closes), wait until it is ready, preload it."""
    backend = backend_for(name)
    if name == "etcd":
        server, probe = start_etcd(cfg.etcd, cfg.workdir), etcd_ready
    else:
        server, probe = start_kv(cfg.kv_server, cfg.store, cfg.workdir, cfg.kv_arg), kv_ready
    stack.callback(stop, server.proc, server.name)
    channel = stack.enter_context(grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS))
    wait_ready(server, channel, probe)
    run = Running(backend, server, channel, 0, {"address": server.address, "pid": server.proc.pid})
    if name == "kv":
        reply = status(channel)
        if reply.store and reply.store != cfg.store:
            raise BenchError(f"kv reports store {reply.store!r}, the benchmark asked for {cfg.store!r}")
        run.info |= {"server_version": reply.server_version, "store": reply.store or cfg.store}
    run.info["preload"] = load_keys(run, cfg, cfg.keys, "preload")
    return run


def load_keys(
    run: Running, cfg: Config, upto: int, label: str, *, batch: int | None = None, flight: int | None = None
) -> dict[str, Any]:
    """Put keys run.keys+1..upto from cfg.bulk_processes client processes, `batch` puts per call
    (kv BatchPut, etcd Txn; default cfg.bulk_batch; 1: single Puts) and `flight` calls in flight
    per process; check that they are all there; the figures."""
    batch = cfg.bulk_batch if batch is None else batch
    flight = cfg.bulk_concurrency if flight is None else flight
    first, count = run.keys + 1, upto - run.keys
    processes = max(1, min(cfg.bulk_processes, count // 1000))
    share = -(-count // processes)
    per_call = loadgen.batch_size(run.backend.name, batch)
    args = []
    for index in range(processes):
        start = first + index * share
        n = min(share, first + count - start)
        where = ["--system", run.backend.name, "--address", run.server.address]
        sizes = ["--concurrency", str(flight), "--value-size", str(cfg.value_size), "--batch", str(per_call)]
        args.append(["bulk", *where, "--first", str(start), "--count", str(n), *sizes])
    how = f"{processes} processes x {flight} calls in flight x {per_call} puts per call"
    log(f"{run.backend.name}: {label}: {count} keys by {how}")
    loadavg = os.getloadavg()[0]
    server_cpu = cpu_seconds(run.server.proc.pid)
    profiling = cfg.profile and run.backend.name == "kv" and label == "bulk"
    with profile.maybe_profile(profiling, run.server.proc.pid, cfg, label) as prof:
        combined = loadgen.run_workers(args, timeout_s=3600)
    server_cores = (cpu_seconds(run.server.proc.pid) - server_cpu) / max(combined.seconds, 1e-9)
    if combined.errors:
        raise BenchError(f"{run.backend.name} {label}: {combined.errors} puts failed")
    present = run.backend.key_count(run.channel)
    if present < upto:
        raise BenchError(f"{run.backend.name} {label}: wrote keys 1..{upto} but the store has {present}")
    run.keys = upto
    log(
        f"{run.backend.name}: {label}: {count} keys in {combined.seconds:.1f} s ({combined.per_s:.0f} keys/s)"
    )
    command = "python -m bench.loadgen " + shlex.join(args[0])
    return {
        "keys": count,
        "keys_per_s": combined.per_s,
        "seconds": combined.seconds,
        "processes": processes,
        "calls_in_flight": flight,
        "puts_per_call": per_call,
        "client_cpu_cores": combined.client_cpu_cores,
        "server_cpu_cores": server_cores,
        "loadavg_1m": loadavg,
        "command": command,
        "profile": prof.summary if prof else None,
    }


# --------------------------------------------------------------------------- h2load measurements


@dataclass
class Measurement:
    """One h2load run of one operation on one system, with the checks made on it."""

    system: str
    operation: str
    label: str
    shape: str
    keys_in_store: int
    loadavg_1m: float
    warmup: LoadResult | None
    load: LoadResult
    response_bytes: int
    server_cpu_cores: float
    command: str
    checks: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None


def request_for(backend: Backend, op: str, run: Running, cfg: Config) -> tuple[str, bytes, str, bytes]:
    """(method, request, key, value) of an operation: get reads the middle preloaded key, put
    rewrites one key, list reads the first page of the preloaded keys."""
    if op == "get":
        key = bench_key(max(1, run.keys // 2))
        return backend.get_method, backend.get_request(key), key, bench_value(key, cfg.value_size)
    if op == "put":
        value = bench_value(PUT_KEY, cfg.value_size)
        return backend.put_method, backend.put_request(PUT_KEY, value), PUT_KEY, value
    return backend.list_method, backend.list_request(KEY_PREFIX, LIST_PAGE), KEY_PREFIX, b""


def preflight(run: Running, op: str, method: str, request: bytes, key: str, value: bytes) -> int:
    """Call with the benchmark body from Python; check the answer; return the framed response size.

    A Put is sent twice: the load rewrites an existing key, whose response can be smaller than
    the one that created it (kv leaves `created: false` out).
    """
    try:
        for _ in range(2 if op == "put" else 1):
            response = call_raw(run.channel, method, request)
    except grpc.RpcError as exc:
        raise BenchError(f"{run.backend.name} {method} with the benchmark body failed: {exc}") from exc
    if op == "get":
        run.backend.check_get(response, key, value)
    if op == "list" and run.backend.list_entries(response) != LIST_PAGE:
        raise BenchError(f"{run.backend.name} {method}: a page of {LIST_PAGE} keys expected")
    return len(grpc_frame(response))


def measure(
    run: Running,
    op: str,
    cfg: Config,
    label: str,
    shape: Shape,
    seconds: float,
    warmup: float,
    system: str = "",
) -> Measurement:
    """Preflight, warm up, measure and check one operation on one system (named `system` in
    the results when it is not the backend's own server)."""
    backend, server = run.backend, run.server
    system = system or backend.name
    method, request, key, value = request_for(backend, op, run, cfg)
    response_bytes = preflight(run, op, method, request, key, value)
    body = cfg.workdir / f"{system}-{op}.grpc"
    body.write_bytes(grpc_frame(request))
    url = f"http://{server.address}{method}"
    name = f"{system} {op} {label}"
    loadavg = os.getloadavg()[0]
    before = backend.revision(run.channel) if op == "put" else 0
    log(f"{name}: h2load {shape.describe()}, warm-up {warmup:g} s, then {seconds:g} s")
    warm = run_h2load(cfg.h2load, url, body, warmup, shape, None) if warmup > 0 else None
    log_file = cfg.workdir / f"{system}-{op}-{label}.log"
    cpu_before = tree_cpu_seconds(server.proc.pid)
    profiling = cfg.profile and system == "kv" and label == "saturated"
    with profile.maybe_profile(profiling, server.proc.pid, cfg, f"{op}-{label}") as prof:
        load = run_h2load(cfg.h2load, url, body, seconds, shape, log_file)
    cores = (tree_cpu_seconds(server.proc.pid) - cpu_before) / load.seconds
    checks = check_load(name, load, response_bytes)
    counted = load.succeeded
    if warm is not None:
        check_load(f"{name} warm-up", warm, response_bytes)
        counted += warm.succeeded
    if op == "put":
        landed = backend.revision(run.channel) - before
        if landed < counted:
            raise BenchError(f"{name}: h2load counted {counted} Puts but the revision grew by {landed}")
        checks |= {"revision_growth": landed, "puts_counted": counted}
    log(f"{name}: {load.requests_per_s:.0f} req/s, {report.lat_text(asdict(load))}")
    command = f"h2load -D {seconds:g} {shape.describe().split(' (')[0]} -H 'content-type: application/grpc' "
    command += f"-H 'te: trailers' -d {body.name} http://{server.address}{method}"
    return Measurement(
        system,
        op,
        label,
        shape.describe(),
        run.keys,
        loadavg,
        warm,
        load,
        response_bytes,
        round(cores, 2),
        command,
        checks,
        prof.summary if prof else None,
    )


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of its live descendants (a server may fork workers)."""
    total = cpu_seconds(pid)
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            total += sum(tree_cpu_seconds(int(child)) for child in children.read_text().split())
    return total


def saturated_shape(cfg: Config) -> Shape:
    return Shape(cfg.concurrency, cfg.streams, cfg.threads)


def sweep_shape(cfg: Config, rate: float) -> Shape:
    # 8 connections x 4 streams: enough room for the rate, little queueing of its own.
    return Shape(8, 4, cfg.threads, rate)


# --------------------------------------------------------------------------- scenarios


class Bench:
    """The measurements of one run, in the order they are taken."""

    def __init__(self, cfg: Config, running: list[Running]) -> None:
        self.cfg = cfg
        self.running = running
        self.measurements: list[Measurement] = []
        self.extra: dict[str, Any] = {
            "rest": [],
            "watch": [],
            "bulk": {},
            "bulk_single": {},
            "random": [],
            "paced": [],
        }

    def saturated(self, op: str, label: str = "saturated") -> None:
        for run in self.running:
            shape = saturated_shape(self.cfg)
            self.measurements.append(
                measure(run, op, self.cfg, label, shape, self.cfg.duration, self.cfg.warmup)
            )

    def ceiling(self) -> None:
        """kv's Get, answered with the same bytes by a server that does nothing else: one
        process, then two sharing the port."""
        kv = next((run for run in self.running if run.backend.name == "kv"), None)
        if kv is None:
            return
        method, request, _, _ = request_for(kv.backend, "get", kv, self.cfg)
        response_file = self.cfg.workdir / "ceiling-response.bin"
        response_file.write_bytes(call_raw(kv.channel, method, request))
        for processes, label in ((1, "saturated"), (2, "saturated-2-processes")):
            port = free_port()
            argv = [sys.executable, str(REPO_ROOT / "bench" / "ceiling_server.py"), "--port", str(port)]
            argv += ["--response", str(response_file), "--method", method, "--processes", str(processes)]
            server = spawn("grpcio-ceiling", argv, self.cfg.workdir, f"127.0.0.1:{port}")
            try:
                with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
                    wait_ready(server, channel, lambda ch: bool(call_raw(ch, method, request, timeout=1.0)))
                    run = Running(kv.backend, server, channel, kv.keys, {})
                    cfg, shape = self.cfg, saturated_shape(self.cfg)
                    found = measure(run, "get", cfg, label, shape, cfg.duration, cfg.warmup, report.CEILING)
            finally:
                stop(server.proc, server.name)
            self.measurements.append(found)

    def sweep(self) -> None:
        for op in ("get", "put"):
            for run in self.running:
                top = self.find(run.backend.name, op, "saturated")
                ceiling = top.load.requests_per_s if top else float("inf")
                for rate in self.cfg.sweep_rates:
                    if rate > SWEEP_MAX_SHARE * ceiling and rate != 1000:
                        continue
                    shape = sweep_shape(self.cfg, rate)
                    secs = self.cfg.sweep_seconds
                    self.measurements.append(measure(run, op, self.cfg, f"rate-{rate:g}", shape, secs, 0.5))
                self.paced(run, op, PACED_RATE)

    def paced(self, run: Running, op: str, rate: float) -> None:
        """The same one-key calls at `rate`, evenly spaced (python -m bench.loadgen paced)."""
        cfg = self.cfg
        _, _, key, _ = request_for(run.backend, op, run, cfg)
        args = ["paced", "--system", run.backend.name, "--address", run.server.address, "--op", op]
        args += [
            "--key",
            key,
            "--rate",
            f"{rate:g}",
            "--seconds",
            f"{cfg.sweep_seconds:g}",
            "--warmup",
            "0.5",
        ]
        args += ["--value-size", str(cfg.value_size)]
        loadavg = os.getloadavg()[0]
        combined = loadgen.run_workers([args], timeout_s=cfg.sweep_seconds + 120)
        if combined.errors or combined.short:
            raise BenchError(
                f"{run.backend.name} paced {op}: {combined.errors} failed, {combined.short} short"
            )
        log(f"{run.backend.name} {op} paced {rate:g}/s: {report.lat_text(combined.as_dict())}")
        entry = {"system": run.backend.name, "operation": op, "rate": rate, "loadavg_1m": loadavg}
        entry |= combined.as_dict() | {"command": "python -m bench.loadgen " + shlex.join(args)}
        self.extra["paced"].append(entry)

    def rest(self) -> None:
        for run in self.running:
            self.extra["rest"].append(self.rest_kv(run) if run.backend.name == "kv" else self.rest_etcd(run))

    def rest_kv(self, run: Running) -> dict[str, Any]:
        cfg = self.cfg
        gateway = rest.start_gateway(int(run.server.address.rsplit(":", 1)[1]), cfg.workdir)
        try:
            key = bench_key(max(1, run.keys // 2))
            url = f"http://{gateway.address}/v1/kv/{key}"
            code, body = rest.http(url)
            if code != 200 or bench_value(key, cfg.value_size) not in body:
                raise BenchError(f"kv REST GET {url}: {code} {body[:200]!r}")
            return self.wrk_run(
                run, "kv", "GET /v1/kv/{key} via Envoy", url, "GET", "", len(body), gateway.proc.pid
            )
        finally:
            stop(gateway.proc, "envoy")

    def rest_etcd(self, run: Running) -> dict[str, Any]:
        key = bench_key(max(1, run.keys // 2))
        url = f"http://{run.server.address}/v3/kv/range"
        payload = rest.etcd_range_body(key)
        code, body = rest.http(url, payload.encode())
        if code != 200 or b'"kvs"' not in body:
            raise BenchError(f"etcd REST POST {url}: {code} {body[:200]!r}")
        return self.wrk_run(
            run, "etcd", "POST /v3/kv/range (etcd's gateway)", url, "POST", payload, len(body), None
        )

    def wrk_run(
        self,
        run: Running,
        system: str,
        what: str,
        url: str,
        method: str,
        payload: str,
        body_len: int,
        extra_pid: int | None,
    ) -> dict[str, Any]:
        cfg = self.cfg
        script = rest.wrk_script(cfg.workdir, f"wrk-{system}", method, payload)
        conns = cfg.rest_connections
        log(f"{system} REST {what}: wrk -c{conns}, {cfg.warmup:g} s warm-up, {cfg.duration:g} s")
        if cfg.warmup > 0:
            rest.run_wrk(cfg.wrk, url, script, cfg.warmup, cfg.rest_connections, body_len)
        loadavg = os.getloadavg()[0]
        pids = {"server": run.server.proc.pid} | ({"envoy": extra_pid} if extra_pid else {})
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        result = rest.run_wrk(cfg.wrk, url, script, cfg.duration, cfg.rest_connections, body_len)
        wall = time.monotonic() - started
        cores = {name: round((cpu_seconds(pid) - before[name]) / wall, 2) for name, pid in pids.items()}
        log(f"{system} REST: {result.requests_per_s:.0f} req/s, {report.lat_text(result.as_dict())}")
        command = f"wrk -t1 -c{conns} -d{rest.wrk_seconds(cfg.duration)}s -s {script.name} {url}"
        info = {"system": system, "what": what, "loadavg_1m": loadavg, "cpu_cores": cores, "command": command}
        return info | result.as_dict()

    def watch(self) -> None:
        cfg = self.cfg
        for rate in cfg.watch_rates:
            for run in self.running:
                plan = FanoutPlan(
                    rate=rate,
                    streams=cfg.watch_streams,
                    seconds=cfg.watch_seconds,
                    warmup=min(1.0, cfg.watch_seconds),
                    drain=cfg.watch_drain,
                    value_size=cfg.value_size,
                )
                profiling = cfg.profile and run.backend.name == "kv" and rate == max(cfg.watch_rates)
                with profile.maybe_profile(profiling, run.server.proc.pid, cfg, f"watch-{rate:g}") as prof:
                    result = asyncio.run(
                        run_fanout(run.backend, run.server.address, run.server.proc.pid, plan, cfg.workdir)
                    )
                entry = result.as_dict() | {"profile": prof.summary if prof else None}
                log(
                    f"{run.backend.name} watch {rate:g} writes/s: p50 {report.fmt(result.p50_ms)} ms, "
                    f"p99 {report.fmt(result.p99_ms)} ms, {result.undelivered} undelivered, "
                    f"{result.events_per_message} events/message, cores {result.cpu_cores}"
                )
                self.extra["watch"].append(entry)

    def bulk(self) -> None:
        """First a share of the keys by single Puts (what a client without batches gets), then
        the rest by batches: the bulk load figure."""
        cfg = self.cfg
        for run in self.running:
            singles = min(run.keys + cfg.single_keys, cfg.big_keys)
            if singles > run.keys:
                entry = load_keys(run, cfg, singles, "bulk-single", batch=1, flight=cfg.single_concurrency)
                self.extra["bulk_single"][run.backend.name] = entry
        for run in self.running:
            self.extra["bulk"][run.backend.name] = load_keys(run, cfg, cfg.big_keys, "bulk")

    def random(self) -> None:
        cfg = self.cfg
        for op in ("get", "put"):
            for run in self.running:
                args = ["random", "--system", run.backend.name, "--address", run.server.address, "--op", op]
                args += ["--keys", str(run.keys), "--seconds", f"{cfg.random_seconds:g}", "--warmup", "0.5"]
                args += ["--concurrency", str(cfg.random_concurrency), "--value-size", str(cfg.value_size)]
                log(f"{run.backend.name} random-key {op} over {run.keys} keys: {cfg.random_seconds:g} s")
                loadavg = os.getloadavg()[0]
                cpu_before = cpu_seconds(run.server.proc.pid)
                combined = loadgen.run_workers([args], timeout_s=cfg.random_seconds + 120)
                cores = (cpu_seconds(run.server.proc.pid) - cpu_before) / max(combined.seconds + 0.5, 1e-9)
                if combined.errors or combined.short:
                    failed = f"{combined.errors} failed, {combined.short} short answers"
                    raise BenchError(f"{run.backend.name} random {op}: {failed}")
                figures = f"{combined.per_s:.0f}/s, {report.lat_text(combined.as_dict())}"
                client = f"client {combined.client_cpu_cores:.2f} cores"
                log(f"{run.backend.name} random-key {op}: {figures}, {client}")
                entry = {"system": run.backend.name, "operation": op, "keys_in_store": run.keys}
                entry |= {"loadavg_1m": loadavg, "server_cpu_cores": round(cores, 2)} | combined.as_dict()
                entry["command"] = "python -m bench.loadgen " + shlex.join(args)
                self.extra["random"].append(entry)

    def find(self, system: str, op: str, label: str, keys: int | None = None) -> Measurement | None:
        for m in reversed(self.measurements):
            if (m.system, m.operation, m.label) == (system, op, label) and (
                keys is None or m.keys_in_store == keys
            ):
                return m
        return None


def run_all(cfg: Config) -> Bench:
    """Start every chosen system, then take each measurement on each system back to back."""
    with contextlib.ExitStack() as stack:
        running = [start_system(name, cfg, stack) for name in cfg.systems]
        bench = Bench(cfg, running)
        chosen = set(cfg.only)
        for op in ("get", "put", "list"):
            if op in chosen or (op != "list" and chosen & {"sweep", "scale"}):
                bench.saturated(op)
            if op == "get" and "ceiling" in chosen:
                bench.ceiling()
        if "rest" in chosen:
            bench.rest()
        if "sweep" in chosen:
            bench.sweep()
        if "watch" in chosen:
            bench.watch()
        if "scale" in chosen:
            bench.random()
        if "bulk" in chosen or "scale" in chosen:
            bench.bulk()
        if "scale" in chosen:
            bench.saturated("get", "saturated-big")
            bench.saturated("put", "saturated-big")
            bench.random()
        for run in running:
            run.info["keys_at_end"] = run.keys
        return bench


# --------------------------------------------------------------------------- main


def missing_tools(cfg: Config) -> list[str]:
    """The executables this configuration needs that are not there."""
    needed = [cfg.h2load] + ([cfg.etcd] if "etcd" in cfg.systems else [])
    needed += [cfg.kv_server] if "kv" in cfg.systems else []
    needed += [cfg.wrk] if "rest" in cfg.only else []
    return [tool for tool in needed if shutil.which(tool) is None]


def tool_version(argv: Sequence[str]) -> str:
    """The first line a tool prints for its version, or "" when it cannot say."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]
    return ""


def environment(cfg: Config) -> dict[str, Any]:
    """The machine and tool versions, for the results."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "etcd": tool_version([cfg.etcd, "--version"]) if "etcd" in cfg.systems else "",
        "h2load": tool_version([cfg.h2load, "--version"]),
        "wrk": tool_version([cfg.wrk, "-v"]),
        "loadavg_at_start": os.getloadavg(),
    }


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
    clock = time.monotonic()
    env = environment(cfg)
    try:
        with work_directory(cfg) as cfg.workdir:
            bench = run_all(cfg)
    except BenchError as exc:
        log("FAILED:", exc)
        return 1
    elapsed = time.monotonic() - clock
    data = {
        "started": started.isoformat(),
        "elapsed_s": round(elapsed, 1),
        "config": {k: v for k, v in asdict(cfg).items() if k != "workdir"},
        "environment": env | {"loadavg_at_end": os.getloadavg()},
        "systems": {run.backend.name: run.info for run in bench.running},
        "measurements": [asdict(m) for m in bench.measurements],
        **bench.extra,
    }
    summary = report.Summary(data)
    data["targets"] = [asdict(t) for t in summary.targets()]
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = cfg.results_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    plot_path = PLOT if cfg.docs else cfg.results_dir / f"{stamp}-latency.png"
    points = [
        Point(m.system, m.operation, m.load.requests_per_s, m.load.p50_ms or 0.0, m.load.p99_ms or 0.0)
        for m in bench.measurements
        if m.operation in ("get", "put") and m.label != "saturated-big" and m.load.p99_ms
    ]
    load_1m = env["loadavg_at_start"][0]
    title = f"kv vs etcd 3.4, {os.cpu_count()} cores, {cfg.keys:,} keys, h2load (load average {load_1m:.2f})"
    plotted = plot_latency(points, plot_path, title)
    if not plotted:
        log("no plot: matplotlib is not installed (bench/install-deps.sh installs it)")
    markdown = summary.markdown(plot_path.name if plotted else None)
    (cfg.results_dir / f"{stamp}.md").write_text(markdown)
    print(summary.text())
    if cfg.docs:
        report.update_docs(DOCS, markdown)
        log(
            "updated",
            DOCS.relative_to(REPO_ROOT),
            "and",
            PLOT.relative_to(REPO_ROOT) if plotted else "(no plot)",
        )
    log(f"results written to {json_path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
