"""The engine of ``kv bench``: one worker's load against kv over gRPC or REST, and its numbers.

A worker is one event loop driving ``concurrency`` closed-loop tasks (each sends a call, waits
for its answer, sends the next). Over gRPC the tasks share ``connections`` channels, each its own
HTTP/2 connection carrying many calls at once; requests are raw bytes (the generated messages'
encoding, the value's part serialised once) and answers stay raw bytes, so the client spends its
CPU on calls, not on protobuf. Over REST every task owns one HTTP/1.1 keep-alive connection to
Envoy (HTTP/1.1 has one request in flight per connection), spoken over asyncio streams.

``kv bench --processes N`` runs N workers as child processes (``child_main``): the parent
writes the worker's settings as one JSON line on its standard input, the worker answers JSON
lines on standard output (``ready``, ``progress``, ``result`` or ``fatal``) and starts its
measured load when the parent writes ``go``, so every worker starts at the same moment. With
one process the worker runs in the parent, through the same class.

Latencies go into a log-linear histogram (``Histogram``): a fixed few thousand counters whatever
the number of calls, within 0.4 % of the exact value, so ``--ops 1e7`` costs no more memory
than ``--ops 100``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlsplit

import grpc
import grpc.aio

from kv.v1 import kv_pb2
from kvclient import _protocol as _p
from kvclient.models import Tls

# --------------------------------------------------------------------------- latency histogram

_SUB_BITS: Final = 7
_SUB: Final = 1 << _SUB_BITS  # counters per power of two above the exact range
_EXACT: Final = 2 * _SUB  # values below this many microseconds are kept exactly
_SLOTS: Final = (40 << _SUB_BITS) + _EXACT  # up to 2**47 us (4 years): any latency


def _slot(micros: int) -> int:
    if micros < _EXACT:
        return max(micros, 0)
    shift = micros.bit_length() - (_SUB_BITS + 1)
    return min((shift << _SUB_BITS) + (micros >> shift), _SLOTS - 1)


def _slot_value(slot: int) -> float:
    """The middle of a counter's range, in microseconds."""
    if slot < _EXACT:
        return float(slot)
    shift = (slot >> _SUB_BITS) - 1
    low = (slot - (shift << _SUB_BITS)) << shift
    return low + (1 << shift) / 2


class Histogram:
    """Latencies in microseconds, HDR-style: exact below 256 us, then 128 counters per power of
    two (a relative error below 0.4 %). The minimum, maximum, count and sum are exact."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts = [0] * _SLOTS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, micros: int) -> None:
        self.counts[_slot(micros)] += 1
        if self.count == 0 or micros < self.min:
            self.min = micros
        if micros > self.max:
            self.max = micros
        self.count += 1
        self.total += micros

    def merge(self, other: Histogram) -> None:
        if other.count == 0:
            return
        for index, n in enumerate(other.counts):
            if n:
                self.counts[index] += n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, fraction: float) -> float:
        """The latency (us) that ``fraction`` of the calls did not exceed; 0 with no calls."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                # The bucket's middle, kept inside what was really seen, so that
                # min <= p50 <= p90 <= p99 <= max always holds.
                return min(max(_slot_value(index), float(self.min)), float(self.max))
        return float(self.max)

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": [[i, n] for i, n in enumerate(self.counts) if n],
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        histogram = cls()
        for index, n in data["counts"]:
            histogram.counts[int(index)] = int(n)
        histogram.count, histogram.total = int(data["count"]), int(data["total"])
        histogram.min, histogram.max = int(data["min"]), int(data["max"])
        return histogram


# --------------------------------------------------------------------------- settings and results


_ALPHABET: Final = b"abcdefghijklmnopqrstuvwxyz0123456789"
_PRINTABLE: Final = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range(256))  # a bytes.translate table


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker needs; JSON-serialisable, as it crosses to child processes."""

    target: str  # "grpc" or "rest"
    address: str  # gRPC: host:port (or several, comma-separated); REST: the base URL
    reads: float
    keys: int
    key_prefix: str
    hot_keys: int  # keys 0..hot_keys-1 are the hot set; == keys for a uniform distribution
    hot_ops: float
    value_size: int
    concurrency: int
    connections: int
    ops: int | None  # this worker's share of --ops, or None for --duration
    duration: float | None
    warmup: float
    preload: bool
    worker: int  # this worker's number: it preloads keys worker, worker + workers, ...
    workers: int
    seed: int
    timeout: float
    token: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    def key(self, index: int) -> str:
        return f"{self.key_prefix}{index:0{len(str(self.keys - 1))}d}"

    def value(self) -> bytes:
        # Printable and JSON-safe, so the same bytes travel as gRPC value_bytes and REST text.
        rng = random.Random(self.seed)  # noqa: S311 - filler, not a secret
        return rng.randbytes(self.value_size).translate(_PRINTABLE)


@dataclass
class WorkerResult:
    """What one worker measured (histograms of successful calls; errors by code)."""

    gets: Histogram = field(default_factory=Histogram)
    puts: Histogram = field(default_factory=Histogram)
    errors: dict[str, int] = field(default_factory=dict)
    misses: int = 0  # Gets of keys that do not exist (NOT_FOUND / 404): served, not failed
    started: float = 0.0  # time.monotonic() of the measured start (one clock for every process)
    finished: float = 0.0
    cpu: float = 0.0  # the process's CPU seconds (every thread) over the measured time
    loop_cpu: float = 0.0  # the event loop thread's CPU seconds: the part that cannot exceed 1 core
    preload_seconds: float = 0.0
    preloaded: int = 0
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gets"], data["puts"] = self.gets.to_json(), self.puts.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerResult:
        values = dict(data)
        values["gets"] = Histogram.from_json(data["gets"])
        values["puts"] = Histogram.from_json(data["puts"])
        return cls(**values)


class Fatal(Exception):
    """The worker cannot run at all (server unreachable, preload failed): one line for the user."""


# Outcome of one call: None for success, MISS for a Get of a missing key, else an error label
# (the gRPC code name, or the HTTP status).
MISS: Final = "miss"
Outcome = str | None
Op = Callable[[bool, int], Awaitable[Outcome]]  # (is_get, key index) -> outcome


# --------------------------------------------------------------------------- gRPC


_GET: Final = "/kv.v1.KeyValue/Get"
_PUT: Final = "/kv.v1.KeyValue/Put"
_STATUS: Final = "/kv.v1.KeyValue/Status"


def _tls_of(config: WorkerConfig) -> Tls | None:
    if not (config.tls or config.tls_ca or config.tls_cert or config.tls_server_name):
        return None
    return Tls.from_files(config.tls_ca, config.tls_cert, config.tls_key, config.tls_server_name)


class GrpcDriver:
    """``connections`` channels, each forced onto its own TCP connection."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.target = _p.normalize_target(config.address)
        self.metadata = _p.call_metadata(config.token)
        # Field 1 (key) is the same in GetRequest and PutRequest, so a Put's bytes are the Get's
        # followed by the value field, which is serialised once for the whole run.
        self.value_field = kv_pb2.PutRequest(value_bytes=config.value()).SerializeToString()
        self.channels: list[grpc.aio.Channel] = []

    async def open(self) -> None:
        tls = _tls_of(self.config)
        # Without a pool of its own, every channel to one target shares one subchannel, hence
        # one TCP connection: --connections would mean nothing. No transparent retries: each
        # call counted is one attempt (and gRPC's retry bookkeeping costs CPU on every call).
        extra = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
        options = _p.channel_options(tls, extra, self.target)
        for _ in range(self.config.connections):
            if tls is None:
                channel = grpc.aio.insecure_channel(self.target, options)
            else:
                channel = grpc.aio.secure_channel(self.target, _p.channel_credentials(tls), options)
            self.channels.append(channel)
        # One real call per channel: connects it, and fails fast with gRPC's own reason
        # (connection refused, bad token) instead of hanging until a deadline.
        for channel in self.channels:
            status = channel.unary_unary(_STATUS, None, None)
            try:
                await status(b"", timeout=self.config.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as error:
                reason = error.details() or error.code().name
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    raise Fatal(f"cannot reach the server at {self.config.address}: {reason}") from None
                raise Fatal(f"the server at {self.config.address} refused Status: {reason}") from None

    def op(self, slot: int) -> Op:
        channel = self.channels[slot % len(self.channels)]
        get = channel.unary_unary(_GET, None, None)
        put = channel.unary_unary(_PUT, None, None)
        key_of, value_field = self.config.key, self.value_field
        timeout, metadata = self.config.timeout, self.metadata
        not_found = grpc.StatusCode.NOT_FOUND

        async def call(is_get: bool, index: int) -> Outcome:
            request = kv_pb2.GetRequest(key=key_of(index)).SerializeToString()
            try:
                if is_get:
                    await get(request, timeout=timeout, metadata=metadata)
                else:
                    await put(request + value_field, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                return MISS if is_get and code == not_found else code.name
            return None

        return call

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


# --------------------------------------------------------------------------- REST (HTTP/1.1)


class RestConnection:
    """One HTTP/1.1 keep-alive connection: a request, then its whole answer, then the next."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.host, self.port, self.ssl = host, port, ssl_context
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send one request (bytes as they go on the wire); the status and the body."""
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        reader = self.reader
        self.writer.write(data)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            body = await reader.readexactly(int(lower[at + 17 : lower.index(b"\r\n", at + 2)]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            body = await self._chunks(reader)
        else:  # no length: the body runs to the end of the connection
            body = await reader.read()
            self.close()
            return status, body
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, body

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:  # the last chunk: skip any trailers, up to the blank line
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])


class RestDriver:
    """kv.v1 through the gateway: ``GET /v1/kv/{key}``, ``PUT /v1/kv/{key}`` with a JSON body."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        url = urlsplit(config.address)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base = url.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self.ssl = ssl.create_default_context(cafile=config.tls_ca)
            if config.tls_cert and config.tls_key:
                self.ssl.load_cert_chain(config.tls_cert, config.tls_key)
        netloc = url.netloc.rsplit("@", 1)[-1]
        headers = f"Host: {netloc}\r\n"
        if config.token:
            headers += f"Authorization: Bearer {config.token}\r\n"
        self.headers = headers.encode("ascii")
        body = b'{"value":"' + config.value() + b'"}'  # printable ASCII: no JSON escaping needed
        self.put_tail = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        self.connections: list[RestConnection] = []

    def path(self, key: str) -> bytes:
        # docs/rest.md, "Keys in URLs": the key's UTF-8 bytes percent-encoded as one segment.
        return f"{self.base}/v1/kv/{quote(key, safe='')}".encode("ascii")

    async def open(self) -> None:
        status_request = b"GET " + self.base.encode() + b"/v1/status HTTP/1.1\r\n" + self.headers + b"\r\n"
        for _ in range(self.config.concurrency):
            connection = RestConnection(self.host, self.port, self.ssl)
            try:
                await asyncio.wait_for(connection.connect(), self.config.timeout)
                status, body = await asyncio.wait_for(connection.request(status_request), self.config.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
                connection.close()
                reason = str(error) or type(error).__name__
                raise Fatal(f"cannot reach the REST gateway at {self.config.address}: {reason}") from None
            if status != 200:
                text = body[:200].decode(errors="replace")
                raise Fatal(
                    f"the REST gateway at {self.config.address} answered {status} to /v1/status: {text}"
                )
            self.connections.append(connection)

    def op(self, slot: int) -> Op:
        connection = self.connections[slot]
        key_of, path, headers, put_tail = self.config.key, self.path, self.headers, self.put_tail
        timeout = self.config.timeout

        async def call(is_get: bool, index: int) -> Outcome:
            target = path(key_of(index))
            if is_get:
                data = b"GET " + target + b" HTTP/1.1\r\n" + headers + b"\r\n"
            else:
                data = b"PUT " + target + b" HTTP/1.1\r\n" + headers + put_tail
            try:
                async with asyncio.timeout(timeout):
                    status, _ = await connection.request(data)
            except TimeoutError:
                connection.close()  # an answer may still come: this connection is out of step
                return "timeout"
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                connection.close()  # the next call reconnects
                return "connection error"
            if status < 300:
                return None
            return MISS if is_get and status == 404 else str(status)

        return call

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()


# --------------------------------------------------------------------------- the worker


class KeyChooser:
    """Which key the next call uses: uniform over every key, or the hot set (keys
    0..hot_keys-1) for ``hot_ops`` of the calls and the other keys for the rest."""

    def __init__(self, config: WorkerConfig, rng: random.Random) -> None:
        self.keys, self.hot, self.hot_ops = config.keys, config.hot_keys, config.hot_ops
        self.random = rng.random

    def next(self) -> int:
        rand = self.random
        if self.hot >= self.keys:
            return int(rand() * self.keys)
        if rand() < self.hot_ops:
            return int(rand() * self.hot)
        return self.hot + int(rand() * (self.keys - self.hot))


class Worker:
    """One process's share of the load: open, preload, then warm up and measure."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.driver: GrpcDriver | RestDriver = (
            RestDriver(config) if config.target == "rest" else GrpcDriver(config)
        )
        self.result = WorkerResult()
        self.phase = "connecting"  # connecting, preloading, ready, warmup, measuring, done
        self.done = 0  # calls finished in the current phase (progress)
        self.failed = 0
        self.stopping = False  # Ctrl-C: finish the calls in flight, then report

    def stop(self) -> None:
        self.stopping = True

    async def open(self) -> None:
        try:
            await self.driver.open()
        except BaseException:
            await self.driver.close()
            raise

    async def preload(self) -> None:
        """Write this worker's share of the keys once, so that Gets find them."""
        config = self.config
        if not config.preload:
            return
        self.phase, self.done = "preloading", 0
        indices = iter(range(config.worker, config.keys, config.workers))
        errors: dict[str, int] = {}
        began = time.monotonic()

        async def task(op: Op) -> None:
            for index in indices:
                if self.stopping:
                    return
                outcome = await op(False, index)
                if outcome is not None:
                    errors[outcome] = errors.get(outcome, 0) + 1
                self.done += 1

        await asyncio.gather(*(task(self.driver.op(slot)) for slot in range(config.concurrency)))
        self.result.preload_seconds = time.monotonic() - began
        self.result.preloaded = self.done
        if errors:
            counts = ", ".join(f"{code} {n}" for code, n in sorted(errors.items()))
            raise Fatal(f"preloading the keys failed: {sum(errors.values())} errors ({counts})")

    async def run(self) -> WorkerResult:
        """The load: ``warmup`` seconds not measured, then ``ops`` calls or ``duration`` seconds."""
        config, result = self.config, self.result
        rng = random.Random(config.seed)  # noqa: S311 - a workload, not a secret
        chooser, reads, rand = KeyChooser(config, rng), config.reads, rng.random
        gets, puts, errors = result.gets.record, result.puts.record, result.errors
        clock = time.perf_counter_ns
        measuring = False
        left = config.ops or 0
        end = 2**63  # perf_counter_ns at which --duration ends
        cpu0 = loop0 = 0.0

        def begin_measuring() -> None:
            nonlocal measuring, end, cpu0, loop0
            measuring = True
            self.phase, self.done, self.failed = "measuring", 0, 0
            result.started = time.monotonic()
            cpu0, loop0 = _process_cpu(), time.thread_time()
            if config.duration is not None:
                end = clock() + int(config.duration * 1e9)

        async def task(op: Op) -> None:
            nonlocal left
            while not self.stopping:
                measured = measuring
                if measured:
                    if config.ops is not None:
                        if left <= 0:
                            return
                        left -= 1
                    elif clock() >= end:
                        return
                is_get = rand() < reads
                began = clock()
                outcome = await op(is_get, chooser.next())
                if not measured:
                    self.done += 1
                    continue
                if outcome is None or outcome == MISS:
                    (gets if is_get else puts)((clock() - began) // 1000)
                    if outcome is not None:
                        result.misses += 1
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1
                    self.failed += 1
                self.done += 1

        async def warmup() -> None:
            await asyncio.sleep(config.warmup)
            begin_measuring()

        self.phase, self.done = "warmup", 0
        timer = None
        if config.warmup > 0:
            timer = asyncio.ensure_future(warmup())
        else:
            begin_measuring()
        tasks = [asyncio.ensure_future(task(self.driver.op(slot))) for slot in range(config.concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            if timer is not None:
                timer.cancel()
            for pending in tasks:
                pending.cancel()
        if not measuring:  # stopped during the warm-up: nothing was measured
            begin_measuring()
        result.finished = time.monotonic()
        result.cpu = _process_cpu() - cpu0
        result.loop_cpu = time.thread_time() - loop0
        result.interrupted = self.stopping
        self.phase = "done"
        return result

    async def close(self) -> None:
        await self.driver.close()


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


# --------------------------------------------------------------------------- child process side

T = TypeVar("T")


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _child(config: WorkerConfig) -> int:
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    # The parent stops its workers with SIGTERM (after Ctrl-C, say): finish, and still report.
    loop.add_signal_handler(signal.SIGTERM, worker.stop)

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.2)
            _send({"progress": {"phase": worker.phase, "done": worker.done, "failed": worker.failed}})

    reporter = asyncio.ensure_future(progress())
    try:
        await worker.open()
        try:
            await worker.preload()
            _send({"ready": True})
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() != "go":
                return 1
            result = await worker.run()
        finally:
            await worker.close()
    except Fatal as error:
        _send({"fatal": str(error)})
        return 1
    finally:
        reporter.cancel()
    _send({"result": result.to_json()})
    return 0


def run_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (the client does not require it): it cuts the
    client's CPU per call, so one process drives more load before it is the bottleneck."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in kv's environment
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return "asyncio"
    return "uvloop"


def child_main() -> int:
    """A worker process: one worker, its settings as a JSON line on standard input."""
    # Ctrl-C in a terminal signals the whole process group; only the parent acts on it (it
    # stops every worker with SIGTERM and prints what they measured).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        config = WorkerConfig(**json.loads(sys.stdin.readline()))
    except (ValueError, TypeError) as error:
        sys.stderr.write(f"kv bench worker: bad settings: {error}\n")
        return 2
    return run_loop(_child(config))
