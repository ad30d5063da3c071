"""Watch fan-out: N streams on one prefix, one writer at a fixed rate, delivery latency per stream.

The receiver is its own process (`python -m bench.watch_fanout ...`) holding every stream over a
few HTTP/2 connections and reading raw bytes (nothing is deserialised). Each written value
carries its sequence number, binary, after a marker (`\\xffSEQ` + 8 bytes big-endian), so for each
message a stream receives, the receiver only keeps the arrival time and the sequence numbers in
it (one regex scan in C). The writer (the parent process) sends seq 1..n at a fixed rate, open
loop, and records when it sent each; a write's delivery latency on a stream is the time from
that send to the arrival of the message carrying it, so it includes the durable commit. Writes
in flight together may commit in either order, so the check is per stream: every write
delivered exactly once, none unknown. Writes not delivered within the drain time count as
infinitely late. After the run the receiver works the latencies out itself (it gets the send
times in a file) and writes only the summary.

The conversation between the two processes, one line each:
    receiver: OPEN      every stream is open (kv: headers received; etcd: `created` received)
    parent:   writes barrier values until
    receiver: READY     every stream has received a barrier: every watch is registered
    parent:   writes seq 1..n at the rate, the send times to a file, then
              `END <n> <first measured seq> <drain seconds> <send times file>`
    receiver: DONE      every stream got n events or the drain time passed; the summary in --out
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
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
SEQ = b"\xffSEQ"
SEQ_RE = re.compile(rb"\xffSEQ(.{8})", re.DOTALL)
BARRIER = b"\xffBAR"
WRITE_KEYS = 100  # the writer cycles through this many keys under the prefix
MAX_IN_FLIGHT = (
    500  # writes awaiting their acknowledgement, at most (kv refuses streams past 1,000 on a connection)
)
OPEN_ATTEMPTS = 50


def seq_value(seq: int, size: int) -> bytes:
    head = SEQ + seq.to_bytes(8, "big")
    return head + b"v" * max(size - len(head), 0)


def seqs_of(chunk: bytes) -> array[int]:
    """The sequence numbers packed in a chunk (8 bytes big-endian each)."""
    values = array("q")
    values.frombytes(chunk)
    if sys.byteorder == "little":
        values.byteswap()
    return values


# --------------------------------------------------------------------------- receiver process


class Stream:
    """One watch stream's bookkeeping: the arrival time and the sequence numbers of each message."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.opened = False
        self.ready = False
        self.count = 0
        self.times = array("d")
        self.chunks: list[bytes] = []
        self.failure = ""

    def on_message(self, data: bytes) -> None:
        now = time.monotonic()
        found = SEQ_RE.findall(data)
        if not found:
            if not self.ready and BARRIER in data:
                self.ready = True
            return
        self.ready = True
        self.times.append(now)
        self.chunks.append(b"".join(found))
        self.count += len(found)


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
                call = channel.stream_stream(backend.watch_method, None, None)(None)
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
            retry = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not stream.opened
            if retry and attempt + 1 < OPEN_ATTEMPTS:
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(remaining, 0.05))
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
        if len(parts) != 5 or parts[0] != "END":
            say(f"FAILED expected END, got {line!r}")
            return 1
        total, first_measured, drain = int(parts[1]), int(parts[2]), float(parts[3])
        await wait_for(lambda: all(s.count >= total or s.failure for s in streams), opened, drain)
        for task in tasks:  # stop receiving before the arithmetic
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sent = array("d")
        sent.frombytes(await asyncio.to_thread(Path(parts[4]).read_bytes))
        summary = summarize(streams, sent, total, first_measured)
        await asyncio.to_thread(Path(ns.out).write_text, json.dumps(summary))
        say("DONE")
        return 0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close(None)


def summarize(
    streams: Sequence[Stream], sent: array[float], total: int, first_measured: int
) -> dict[str, Any]:
    """Latency percentiles over every (measured write, stream) pair; undelivered ones count as
    infinitely late. Fails (in the summary) on a duplicate, an unknown sequence number or a stream
    that broke."""
    latencies: list[float] = []
    messages = events = undelivered = 0
    problems: list[str] = []
    for stream in streams:
        if stream.failure:
            problems.append(f"stream {stream.index} failed: {stream.failure}")
        seen: array[int] = array("q")
        for t, chunk in zip(stream.times, stream.chunks, strict=True):
            seqs = seqs_of(chunk)
            seen.extend(seqs)
            measured = [s for s in seqs if s >= first_measured]
            if measured:
                latencies.extend([t - sent[s] for s in measured])
                messages += 1
                events += len(measured)
        distinct = set(seen)
        if len(distinct) != len(seen) or (seen and (min(seen) < 1 or max(seen) > total)):
            problems.append(f"stream {stream.index}: duplicate or unknown writes delivered")
        if len(distinct) < total:
            undelivered += sum(1 for s in range(first_measured, total + 1) if s not in distinct)
    latencies.sort()
    ordered = latencies + [float("inf")] * undelivered

    def ms(value: float | None) -> float | None:
        return None if value is None or value == float("inf") else round(value * 1000, 2)

    return {
        "problems": problems[:10],
        "deliveries": len(latencies),
        "undelivered": undelivered,
        "p50_ms": ms(percentile(ordered, 50)),
        "p99_ms": ms(percentile(ordered, 99)),
        "max_ms": ms(ordered[-1] if ordered else None),
        "messages": messages,
        "events_per_message": round(events / messages, 1) if messages else 0.0,
    }


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
    write_failures: int  # writes that got an error (a timeout): their deliveries still count
    write_ack_p50_ms: float | None  # None: beyond RPC_TIMEOUT_S (failed)
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
    if proc.stdout is None:
        raise BenchError("the receiver has no stdout pipe")
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
        pids = {"server": server_pid, "receiver": proc.pid}
        cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()} | {"writer": _self_cpu()}
        started = time.monotonic()
        sent, acked, write_failures = await _write(put, backend, plan, total)
        writing = time.monotonic() - started
        cpu_after = {k: cpu_seconds(pid) for k, pid in pids.items()} | {"writer": _self_cpu()}
    cpu = {k: round((cpu_after[k] - cpu_before[k]) / writing, 2) for k in cpu_before}
    sent_file = out.with_suffix(".sent")
    await asyncio.to_thread(sent_file.write_bytes, array("d", sent).tobytes())
    if proc.stdin is None:
        raise BenchError("the receiver has no stdin pipe")
    proc.stdin.write(f"END {total} {warm_n + 1} {plan.drain:g} {sent_file}\n".encode())
    await proc.stdin.drain()
    line = await _read_line(proc, plan.drain + 120)
    if line != "DONE":
        raise BenchError(f"{name}: the receiver said {line!r} instead of DONE")
    await asyncio.wait_for(proc.wait(), 30)
    summary = json.loads(await asyncio.to_thread(out.read_text))
    if summary["problems"]:
        raise BenchError(f"{name}: {'; '.join(summary['problems'])}")
    measured = total - warm_n
    acks = sorted(acked[s] - sent[s] if acked[s] else float("inf") for s in range(warm_n + 1, total + 1))
    span = sent[total] - sent[warm_n + 1] if measured > 1 else 0.0
    return FanoutResult(
        system=backend.name,
        streams=plan.streams,
        rate=plan.rate,
        write_rate=round((measured - 1) / span, 1) if span > 0 else 0.0,
        writes_measured=measured,
        deliveries_expected=measured * plan.streams,
        deliveries=summary["deliveries"],
        undelivered=summary["undelivered"],
        p50_ms=summary["p50_ms"],
        p99_ms=summary["p99_ms"],
        max_ms=summary["max_ms"],
        messages=summary["messages"],
        events_per_message=summary["events_per_message"],
        write_failures=write_failures,
        write_ack_p50_ms=_ms(percentile(acks, 50)),
        write_ack_p99_ms=_ms(percentile(acks, 99)),
        cpu_cores=cpu,
        drain_s=plan.drain,
        loadavg_1m=loadavg,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or seconds == float("inf") else round(seconds * 1000, 2)


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _write(
    put: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], backend: Backend, plan: FanoutPlan, total: int
) -> tuple[list[float], list[float], int]:
    """Send seq 1..total at plan.rate, open loop (a write does not wait for the one before);
    return the send and acknowledgement times, indexed by seq."""
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
    if seq < total:
        raise BenchError(f"{backend.name}: the writer sent {seq} of {total} writes")
    # A failed write (a server too busy to answer within RPC_TIMEOUT_S) is a result, not a broken
    # measurement: it is reported, and if it was applied its deliveries still count.
    codes = sorted({str(exc.code()) for exc in failures if isinstance(exc, grpc.aio.AioRpcError)})
    if failures:
        log(f"{backend.name}: {len(failures)} of {total} watch writes failed: {', '.join(codes)}")
    return sent, acked, len(failures)


if __name__ == "__main__":
    sys.exit(main())
