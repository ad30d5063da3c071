"""Python load for what h2load cannot do: many different keys (h2load sends one fixed body).

Run as worker processes (`python -m bench.loadgen ...`: the result as JSON on stdout, or in the
file `--result` names), started and collected by `run_workers`, which reads the files (a pipe's
output can carry whatever a library prints):

    bulk    Puts of keys first..first+count-1 (bench/key/NNNNNNN), `concurrency` calls in flight;
            with --batch N, N puts per call: kv's BatchPut, etcd's Txn (at most 128 puts, etcd's
            default --max-txn-ops, whatever N says)
    random  Gets or Puts of keys drawn uniformly from 1..keys for a fixed time, with latencies
    paced   Gets or Puts of one key at a fixed rate, evenly spaced, open loop: the latency of
            each call counts from when it was due (h2load --rps sends its calls in bursts of
            about 10 every 10 ms, which adds the burst's queueing to every latency)

Both talk raw bytes through generic grpc.aio calls (no (de)serialisation on the client), on
uvloop. Every call must succeed, and every Get must bring at least the value's bytes back (etcd
answers a missing key with an empty OK).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import uvloop

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.h2load import percentile
from bench.systems import RPC_TIMEOUT_S, backend_for, bench_key, bench_value
from bench.wire import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerResult:
    """What one worker process reports."""

    calls: int
    errors: int
    short: int  # Gets whose response was smaller than the value: the key was missing
    started: float  # time.monotonic() (CLOCK_MONOTONIC: comparable across processes)
    finished: float
    latencies_ms: list[float]


async def bulk(ns: argparse.Namespace) -> WorkerResult:
    """Put keys first..first+count-1, `concurrency` calls at a time, `batch` keys per call."""
    if ns.batch > 1:
        return await bulk_batched(ns)
    backend = backend_for(ns.system)
    indices = iter(range(ns.first, ns.first + ns.count))
    errors = 0

    async def worker(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        nonlocal errors
        for index in indices:
            key = bench_key(index)
            try:
                await call(backend.put_request(key, bench_value(key, ns.value_size)), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError:
                errors += 1

    async with grpc.aio.insecure_channel(ns.address) as channel:
        call = channel.unary_unary(backend.put_method, None, None)
        await channel.channel_ready()
        started = time.monotonic()
        await asyncio.gather(*(worker(call) for _ in range(ns.concurrency)))
        finished = time.monotonic()
    return WorkerResult(ns.count, errors, 0, started, finished, [])


def batch_size(system: str, requested: int) -> int:
    """The puts per call of a batched bulk load: `requested`, within the system's maximum."""
    return max(1, min(requested, backend_for(system).max_batch))


async def bulk_batched(ns: argparse.Namespace) -> WorkerResult:
    """Put keys first..first+count-1 in calls of `batch_size(system, batch)` puts, `concurrency`
    calls at a time. `calls` counts keys, as for single Puts; `errors` counts keys not written."""
    backend = backend_for(ns.system)
    size = batch_size(ns.system, ns.batch)
    starts = iter(range(ns.first, ns.first + ns.count, size))
    end = ns.first + ns.count
    errors = 0

    async def worker(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        nonlocal errors
        for start in starts:
            keys = [bench_key(index) for index in range(start, min(start + size, end))]
            body = backend.batch_put_request([(key, bench_value(key, ns.value_size)) for key in keys])
            try:
                response = await call(body, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError:
                errors += len(keys)
                continue
            errors += backend.check_batch_put(response, len(keys))

    async with grpc.aio.insecure_channel(ns.address) as channel:
        call = channel.unary_unary(backend.batch_put_method, None, None)
        await channel.channel_ready()
        started = time.monotonic()
        await asyncio.gather(*(worker(call) for _ in range(ns.concurrency)))
        finished = time.monotonic()
    return WorkerResult(ns.count, errors, 0, started, finished, [])


async def random_ops(ns: argparse.Namespace) -> WorkerResult:
    """Gets or Puts of uniformly random keys for ns.seconds (after ns.warmup unmeasured seconds)."""
    backend = backend_for(ns.system)
    rng = random.Random(ns.seed)  # noqa: S311 - load, not secrets
    latencies: list[float] = []
    errors = short = 0
    method = backend.get_method if ns.op == "get" else backend.put_method

    def request() -> bytes:
        key = bench_key(rng.randint(1, ns.keys))
        if ns.op == "get":
            return backend.get_request(key)
        return backend.put_request(key, bench_value(key, ns.value_size))

    async def worker(
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], measure_from: float, end: float
    ) -> None:
        nonlocal errors, short
        for _ in range(10_000_000):  # bounded; ends at `end`
            body = request()
            began = time.perf_counter()
            if began >= end:
                return
            try:
                response = await call(body, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError:
                errors += 1
                continue
            took = time.perf_counter() - began
            if ns.op == "get" and len(response) < ns.value_size:
                short += 1
            if began >= measure_from:
                latencies.append(took * 1000)

    async with grpc.aio.insecure_channel(ns.address) as channel:
        call = channel.unary_unary(method, None, None)
        await channel.channel_ready()
        now = time.perf_counter()
        measure_from, end = now + ns.warmup, now + ns.warmup + ns.seconds
        started = time.monotonic() + ns.warmup
        await asyncio.gather(*(worker(call, measure_from, end) for _ in range(ns.concurrency)))
        finished = time.monotonic()
    return WorkerResult(len(latencies), errors, short, started, finished, latencies)


async def paced(ns: argparse.Namespace) -> WorkerResult:
    """One key at ns.rate calls a second, evenly spaced, for ns.warmup + ns.seconds."""
    backend = backend_for(ns.system)
    if ns.op == "get":
        method, request = backend.get_method, backend.get_request(ns.key)
    else:
        method, request = backend.put_method, backend.put_request(ns.key, bench_value(ns.key, ns.value_size))
    latencies: list[float] = []
    errors = short = 0
    warm_n = round(ns.warmup * ns.rate)
    total = warm_n + round(ns.seconds * ns.rate)

    async def one(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], index: int, due: float) -> None:
        nonlocal errors, short
        try:
            response = await call(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            errors += 1
            return
        if ns.op == "get" and len(response) < ns.value_size:
            short += 1
        if index >= warm_n:
            latencies.append((time.perf_counter() - due) * 1000)

    async with grpc.aio.insecure_channel(ns.address) as channel:
        call = channel.unary_unary(method, None, None)
        await channel.channel_ready()
        tasks = []
        start = time.perf_counter()
        started = time.monotonic() + ns.warmup
        for index in range(total):
            due = start + index / ns.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(call, index, due)))
        await asyncio.gather(*tasks)
        finished = time.monotonic()
    return WorkerResult(len(latencies), errors, short, started, finished, latencies)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("bulk", "random", "paced"))
    p.add_argument("--system", choices=("kv", "etcd"), required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--first", type=int, default=1, help="bulk: first key index")
    p.add_argument("--count", type=int, default=0, help="bulk: keys to write")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="bulk: puts per call; above 1, kv's BatchPut or etcd's Txn (etcd: at most 128)",
    )
    p.add_argument("--op", choices=("get", "put"), default="get", help="random: the operation")
    p.add_argument("--keys", type=int, default=0, help="random: keys 1..keys exist")
    p.add_argument("--seconds", type=float, default=5.0, help="random: measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="random: seconds before measuring")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--result", type=Path, help="write the result here instead of stdout")
    p.add_argument("--rate", type=float, default=1000.0, help="paced: calls a second")
    p.add_argument("--key", default="", help="paced: the key")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    runner = {"bulk": bulk, "random": random_ops, "paced": paced}[ns.mode]
    result = uvloop.run(runner(ns))
    if ns.result is None:
        print(json.dumps(result.__dict__))
    else:
        ns.result.write_text(json.dumps(result.__dict__))
    return 0


# --------------------------------------------------------------------------- the parent's side


@dataclass
class Combined:
    """The workers' results together."""

    calls: int
    errors: int
    short: int
    seconds: float  # from the first worker's start to the last one's end
    per_s: float
    p50_ms: float | None
    p99_ms: float | None
    processes: int
    client_cpu_cores: float  # CPU the worker processes used over `seconds`

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_workers(args: Sequence[Sequence[str]], timeout_s: float) -> Combined:
    """Start one worker process per argument list at once, wait for all, combine their results."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with tempfile.TemporaryDirectory(prefix="kv-loadgen-") as out_dir:
        files = [Path(out_dir) / f"worker-{index}.json" for index in range(len(args))]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", *arg, "--result", str(file)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=REPO_ROOT,
                env=env,
            )
            for arg, file in zip(args, files, strict=True)
        ]
        results: list[WorkerResult] = []
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        deadline = time.monotonic() + timeout_s
        try:
            for proc, file in zip(procs, files, strict=True):
                try:
                    _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
                except subprocess.TimeoutExpired as exc:
                    raise BenchError(f"a load worker did not finish within {timeout_s:g} s") from exc
                if proc.returncode != 0:
                    raise BenchError(
                        f"load worker exited with {proc.returncode}:\n{err.decode(errors='replace')}"
                    )
                results.append(WorkerResult(**json.loads(file.read_text())))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Only these workers end in this interval: the CPU of children reaped meanwhile is theirs.
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    started = min(r.started for r in results)
    seconds = max(r.finished for r in results) - started
    latencies = sorted(value for r in results for value in r.latencies_ms)
    calls = sum(r.calls for r in results)
    return Combined(
        calls=calls,
        errors=sum(r.errors for r in results),
        short=sum(r.short for r in results),
        seconds=seconds,
        per_s=calls / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        processes=len(procs),
        client_cpu_cores=cpu / seconds if seconds > 0 else 0.0,
    )


if __name__ == "__main__":
    sys.exit(main())
