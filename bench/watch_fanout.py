"""Watch fan-out: N streams on one prefix, one writer at a fixed rate, delivery latency per stream.

The receiver is its own process (`python -m bench.watch_fanout ...`) holding every stream over a
few HTTP/2 connections, reading raw bytes (nothing is deserialised). Each written value carries
its sequence number (`seq=000000000042;`), so for each message a stream receives the receiver
notes only the time and the first and last sequence numbers in it (bytes.find / rfind) and
checks that the count of events in it fills that range and that the range follows the previous
one: every stream must see every write, once, in order. The writer (the parent process) records
when it sent each write; a write's delivery latency on a stream is the time from that send to the
arrival of the message carrying it (so it includes the durable commit). Writes not delivered
within the drain time count as infinitely late.

The conversation between the two processes, one line each:
    receiver: OPEN      every stream is open (kv: headers received; etcd: `created` received)
    parent:   writes barrier values (`bar=`) until
    receiver: READY     every stream has received a barrier: every watch is registered
    parent:   writes seq 1..n at the rate, then sends `END <n> <drain seconds>`
    receiver: DONE      after every stream saw seq n or the drain time passed; results in --out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from array import array
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
from bench.systems import RPC_TIMEOUT_S, WATCH_PREFIX, Backend, backend_for, cpu_seconds, log
from bench.wire import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
SEQ = b"seq="
SEQ_DIGITS = 12
BARRIER = b"bar="
WRITE_KEYS = 100  # the writer cycles through this many keys under the prefix
MAX_IN_FLIGHT = 5000  # writes awaiting their acknowledgement, at most
OPEN_ATTEMPTS = 50


def seq_value(seq: int, size: int) -> bytes:
    head = SEQ + str(seq).zfill(SEQ_DIGITS).encode() + b";"
    return head + b"v" * max(size - len(head), 0)


# --------------------------------------------------------------------------- receiver process


class Stream:
    """One watch stream's bookkeeping."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.opened = False
        self.ready = False
        self.expect = 1
        self.errors = 0
        self.times = array("d")
        self.firsts = array("q")
        self.lasts = array("q")
        self.failure = ""

    def on_message(self, data: bytes) -> None:
        now = time.monotonic()
        first = data.find(SEQ)
        if first < 0:
            if not self.ready and BARRIER in data:
                self.ready = True
            return
        self.ready = True
        last = data.rfind(SEQ)
        a = int(data[first + 4 : first + 4 + SEQ_DIGITS])
        b = int(data[last + 4 : last + 4 + SEQ_DIGITS])
        if a != self.expect or data.count(SEQ) != b - a + 1:
            self.errors += 1  # a gap, a duplicate or disorder
        self.expect = b + 1
        self.times.append(now)
        self.firsts.append(a)
        self.lasts.append(b)


async def hold_stream(
    stream: Stream, channel: grpc.aio.Channel, backend: Backend, request: bytes, opened: asyncio.Event
) -> None:
    for attempt in range(OPEN_ATTEMPTS):
        try:
            if backend.name == "kv":
                call: Any = channel.unary_stream(backend.watch_method, None, None)(request)
                await call.initial_metadata()
                stream.opened = True
                opened.set()
            else:
                call = channel.stream_stream(backend.watch_method, None, None)()
                await call.write(request)  # the send side stays open: etcd keeps the watch
            async for data in call:
                if not stream.opened:  # etcd's first answer says `created`
                    stream.opened = True
                    opened.set()
                stream.on_message(data)
            return
        except grpc.aio.AioRpcError as exc:
            # The streams of a previous receiver may still be closing on the server (kv counts
            # open watch streams against --max-watch-streams): try again, a bounded number of times.
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not stream.opened:
                if attempt + 1 < OPEN_ATTEMPTS:
                    await asyncio.sleep(0.2)
                    continue
            stream.failure = f"{exc.code()}: {exc.details()}"
            opened.set()
            return


async def wait_for(condition: Any, event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until condition() holds, re-checking whenever `event` is set or every 50 ms."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.05) + 2):
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bool(condition())
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), min(remaining, 0.05))
        except TimeoutError:
            pass
    return bool(condition())


async def receive(ns: argparse.Namespace) -> int:
    backend = backend_for(ns.system)
    request = backend.watch_request(ns.prefix)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    channels = [grpc.aio.insecure_channel(ns.address, options=options) for _ in range(ns.channels)]
    streams = [Stream(i) for i in range(ns.streams)]
    opened = asyncio.Event()
    tasks = [
        asyncio.create_task(hold_stream(s, channels[s.index % ns.channels], backend, request, opened))
        for s in streams
    ]
    loop = asyncio.get_running_loop()

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        if not await wait_for(lambda: all(s.opened for s in streams), opened, ns.open_timeout):
            failed = [s.failure for s in streams if s.failure] or ["timeout"]
            say(f"FAILED {sum(not s.opened for s in streams)} streams did not open: {failed[0]}")
            return 1
        failures = [s.failure for s in streams if s.failure]
        if failures:
            say(f"FAILED {len(failures)} streams failed: {failures[0]}")
            return 1
        say("OPEN")
        if not await wait_for(lambda: all(s.ready for s in streams), opened, ns.open_timeout):
            say(f"FAILED {sum(not s.ready for s in streams)} streams never saw the barrier")
            return 1
        say("READY")
        line = await loop.run_in_executor(None, sys.stdin.readline)
        parts = line.split()
        if len(parts) != 3 or parts[0] != "END":
            say(f"FAILED expected END, got {line!r}")
            return 1
        final, drain = int(parts[1]), float(parts[2])
        await wait_for(lambda: all(s.expect > final or s.failure for s in streams), opened, drain)
        finished = time.monotonic()
        results = {
            "finished": finished,
            "streams": [
                {
                    "errors": s.errors,
                    "failure": s.failure,
                    "times": s.times.tolist(),
                    "firsts": s.firsts.tolist(),
                    "lasts": s.lasts.tolist(),
                }
                for s in streams
            ],
        }
        Path(ns.out).write_text(json.dumps(results))
        say("DONE")
        return 0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=("kv", "etcd"), required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--prefix", default=WATCH_PREFIX)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--channels", type=int, default=4, help="HTTP/2 connections the streams share")
    p.add_argument("--open-timeout", type=float, default=60.0)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    return uvloop.run(receive(ns))


# --------------------------------------------------------------------------- the parent's side


@dataclass
class FanoutResult:
    system: str
    streams: int
    rate: float  # writes a second asked for
    write_rate: float  # writes a second sent over the measured part
    writes_measured: int
    deliveries_expected: int
    deliveries: int
    undelivered: int  # not delivered within the drain time: counted as infinitely late
    p50_ms: float | None  # None: beyond the drain time (undelivered)
    p99_ms: float | None
    max_ms: float | None
    messages: int  # messages with events, over every stream, for the measured writes
    events_per_message: float
    write_ack_p50_ms: float | None
    write_ack_p99_ms: float | None
    cpu_cores: dict[str, float]
    drain_s: float
    loadavg_1m: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FanoutPlan:
    rate: float
    streams: int
    seconds: float
    warmup: float
    drain: float
    value_size: int
    channels: int = 4


async def _read_line(proc: asyncio.subprocess.Process, timeout_s: float) -> str:
    assert proc.stdout is not None
    try:
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    except TimeoutError:
        return ""
    return raw.decode().strip()


async def run_fanout(
    backend: Backend, address: str, server_pid: int, plan: FanoutPlan, workdir: Path
) -> FanoutResult:
    """One fan-out measurement against a running server."""
    out = workdir / f"watch-{backend.name}-{plan.rate:g}.json"
    argv = [sys.executable, "-m", "bench.watch_fanout", "--system", backend.name, "--address", address]
    argv += ["--streams", str(plan.streams), "--channels", str(plan.channels), "--out", str(out)]
    with (workdir / f"watch-{backend.name}-{plan.rate:g}.log").open("wb") as errors:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )
    try:
        return await _drive(backend, address, server_pid, plan, proc, out)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _drive(
    backend: Backend,
    address: str,
    server_pid: int,
    plan: FanoutPlan,
    proc: asyncio.subprocess.Process,
    out: Path,
) -> FanoutResult:
    name = f"{backend.name} watch {plan.streams} streams at {plan.rate:g} writes/s"
    line = await _read_line(proc, 90)
    if line != "OPEN":
        raise BenchError(f"{name}: the receiver said {line!r} instead of OPEN")
    async with grpc.aio.insecure_channel(address) as channel:
        put = channel.unary_unary(backend.put_method, None, None)
        barrier = backend.put_request(f"{WATCH_PREFIX}barrier", BARRIER + b"v" * plan.value_size)
        for _ in range(100):  # a watch registers just after its stream opens: barrier until all see one
            await put(barrier, timeout=RPC_TIMEOUT_S)
            line = await _read_line(proc, 0.5)
            if line:
                break
        if line != "READY":
            raise BenchError(f"{name}: the receiver said {line!r} instead of READY")
        warm_n = round(plan.warmup * plan.rate)
        total = warm_n + round(plan.seconds * plan.rate)
        log(f"{name}: {plan.warmup:g} s warm-up, {plan.seconds:g} s measured")
        loadavg = os.getloadavg()[0]
        cpu_before = {"server": cpu_seconds(server_pid), "receiver": cpu_seconds(proc.pid)}
        self_before = _self_cpu()
        sent, acked, measured_window = await _write(put, backend, plan, total, warm_n)
        cpu_after = {"server": cpu_seconds(server_pid), "receiver": cpu_seconds(proc.pid)}
        self_after = _self_cpu()
    assert proc.stdin is not None
    proc.stdin.write(f"END {total} {plan.drain:g}\n".encode())
    await proc.stdin.drain()
    line = await _read_line(proc, plan.drain + 60)
    if line != "DONE":
        raise BenchError(f"{name}: the receiver said {line!r} instead of DONE")
    await asyncio.wait_for(proc.wait(), 30)
    window = measured_window if measured_window > 0 else 1.0
    cpu = {k: round((cpu_after[k] - cpu_before[k]) / window, 2) for k in cpu_before}
    cpu["writer"] = round((self_after - self_before) / window, 2)
    return _latencies(backend.name, plan, json.loads(out.read_text()), sent, acked, warm_n, cpu, loadavg)


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _write(
    put: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    backend: Backend,
    plan: FanoutPlan,
    total: int,
    warm_n: int,
) -> tuple[list[float], list[float], float]:
    """Send seq 1..total at plan.rate (open loop); return send times, ack times (index = seq)
    and the seconds the measured writes took to send."""
    sent = [0.0] * (total + 1)
    acked = [0.0] * (total + 1)
    requests = [
        backend.put_request(f"{WATCH_PREFIX}k{seq % WRITE_KEYS:03d}", seq_value(seq, plan.value_size))
        for seq in range(total + 1)
    ]
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    failures: list[BaseException] = []

    async def one(seq: int) -> None:
        try:
            await put(requests[seq], timeout=RPC_TIMEOUT_S)
            acked[seq] = time.monotonic()
        except grpc.RpcError as exc:
            failures.append(exc)
        finally:
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    seq = 0
    for _ in range(total * 4 + 1000):  # bounded: each round sends what is due, then sleeps
        if seq >= total:
            break
        due = min(total, int((time.monotonic() - started) * plan.rate) + 1)
        while seq < due:
            await slots.acquire()
            seq += 1
            sent[seq] = time.monotonic()
            tasks.append(asyncio.create_task(one(seq)))
        await asyncio.sleep(max(started + seq / plan.rate - time.monotonic(), 0))
    await asyncio.wait_for(asyncio.gather(*tasks), RPC_TIMEOUT_S + 5)
    if failures or seq < total:
        raise BenchError(f"{backend.name}: {len(failures)} of {total} watch writes failed: {failures[:1]}")
    measured = sent[total] - sent[warm_n + 1] if total > warm_n + 1 else 0.0
    return sent, acked, measured


def _latencies(
    system: str,
    plan: FanoutPlan,
    results: dict[str, Any],
    sent: list[float],
    acked: list[float],
    warm_n: int,
    cpu: dict[str, float],
    loadavg: float,
) -> FanoutResult:
    total = len(sent) - 1
    first_measured = warm_n + 1
    latencies = array("d")
    messages = events = undelivered = 0
    for index, stream in enumerate(results["streams"]):
        if stream["errors"] or stream["failure"]:
            raise BenchError(
                f"{system} watch stream {index}: {stream['errors']} gaps or duplicates, "
                f"failure {stream['failure']!r}"
            )
        last_seen = 0
        for t, a, b in zip(stream["times"], stream["firsts"], stream["lasts"], strict=True):
            last_seen = b
            lo = max(a, first_measured)
            if lo > b:
                continue
            latencies.extend([t - s for s in sent[lo : b + 1]])
            messages += 1
            events += b - lo + 1
        undelivered += total - max(last_seen, warm_n) if last_seen < total else 0
    measured_writes = total - warm_n
    ordered = sorted(latencies)
    ordered += [float("inf")] * undelivered

    def ms(value: float | None) -> float | None:
        return None if value is None or value == float("inf") else round(value * 1000, 2)

    acks = sorted(acked[s] - sent[s] for s in range(first_measured, total + 1))
    measured_s = sent[total] - sent[first_measured] if total > first_measured else 0.0
    return FanoutResult(
        system=system,
        streams=plan.streams,
        rate=plan.rate,
        write_rate=round((measured_writes - 1) / measured_s, 1) if measured_s > 0 else 0.0,
        writes_measured=measured_writes,
        deliveries_expected=measured_writes * plan.streams,
        deliveries=len(latencies),
        undelivered=undelivered,
        p50_ms=ms(percentile(ordered, 50)),
        p99_ms=ms(percentile(ordered, 99)),
        max_ms=ms(ordered[-1] if ordered else None),
        messages=messages,
        events_per_message=round(events / messages, 1) if messages else 0.0,
        write_ack_p50_ms=ms(percentile(acks, 50)),
        write_ack_p99_ms=ms(percentile(acks, 99)),
        cpu_cores=cpu,
        drain_s=plan.drain,
        loadavg_1m=loadavg,
    )


if __name__ == "__main__":
    sys.exit(main())
