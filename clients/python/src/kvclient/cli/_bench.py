"""``kv bench``: a load tester for kv over gRPC or REST (its options, runs and report).

The load itself is ``_loadgen``'s: this module checks the options, splits the load over worker
processes (in this process when there is one), draws the progress bar, merges what the workers
measured and reports it as text or as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from kvclient.cli._loadgen import (
    Fatal,
    Histogram,
    Worker,
    WorkerConfig,
    WorkerResult,
    loop_name,
    run_loop,
)
from kvclient.models import Tls

__all__ = ["configure"]

# The statuses of kvclient.cli._app (not imported from there: _app imports this module).
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_SERVER: Final = 4
EXIT_INTERRUPTED: Final = 130

BOTTLENECK_LOOP_SHARE: Final = 0.85
"""An event loop busy this share of the time runs out of its one core: the client is the limit."""

MACHINE_BUSY: Final = 0.9
"""All the machine's CPUs this busy: a server on the same machine shared them with kv bench."""

MAX_PROCESSES: Final = 64
MAX_CONCURRENCY: Final = 100_000
MAX_VALUE_SIZE: Final = 4_000_000  # under gRPC's default 4 MiB message limit

EXAMPLES: Final = """\
  kv bench --duration 10 --preload                    90% Get, 10,000 keys, 10 s
  kv bench --ops 100000 --reads 0.5 --concurrency 128 --connections 8
  kv bench --reads 1 --preload --processes 2 -o json  when one client process is not enough
  kv bench --distribution hotset --hot-keys 0.01 --hot-ops 0.9
  kv bench --rest http://127.0.0.1:8080 --concurrency 32 --preload"""

DESCRIPTION: Final = """\
Load kv with Gets and Puts of random keys, from many calls in flight at once, and report
throughput and latency percentiles (p50, p90, p99, max) of Gets, Puts and both. Over gRPC
(--address) the calls share --connections HTTP/2 connections; with --rest they go through the
REST gateway, one HTTP/1.1 keep-alive connection per call in flight. A progress bar shows on
standard error when it is a terminal. The exit status is 0 when every call succeeded, 4 when any
failed (a Get of a missing key is a "miss", not a failure), 2 for a bad option.

When a worker process keeps its event loop busy more than 85% of the time, the report says the
load tester was the bottleneck: add --processes."""


# --------------------------------------------------------------------------- option types


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def _count(text: str) -> int:
    """A positive whole number; ``1e6`` and ``100_000`` are accepted."""
    try:
        number = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not number.is_integer() or number < 1 or number > 1e12:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 1e12: {text!r}")
    return int(number)


def _size(text: str) -> int:
    try:
        number = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if not number.is_integer() or not 0 <= number <= MAX_VALUE_SIZE:
        raise argparse.ArgumentTypeError(f"must be a whole number of bytes from 0 to {MAX_VALUE_SIZE:,}")
    return int(number)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more: {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kv bench`` to its subparser (the connection options are _app's)."""
    parser.description = DESCRIPTION
    parser.epilog = "examples:\n" + EXAMPLES + "\n\nthe JSON report (-o json) is described in USAGE.md"
    mix = parser.add_argument_group("workload")
    mix.add_argument(
        "--reads", type=_fraction, default=0.9, metavar="FRACTION", help="share of Gets, the rest Puts (0.9)"
    )
    mix.add_argument("--keys", type=_count, default=10_000, metavar="N", help="distinct keys (10000)")
    mix.add_argument("--key-prefix", default="bench/", metavar="P", help="keys are P0000... (bench/)")
    mix.add_argument(
        "--distribution",
        choices=("uniform", "hotset"),
        default="uniform",
        help="uniform over the keys, or a hot set (uniform)",
    )
    mix.add_argument(
        "--hot-keys",
        type=_fraction,
        metavar="FRACTION",
        help="hotset: share of the keys that are hot, the first ones (0.2)",
    )
    mix.add_argument(
        "--hot-ops", type=_fraction, metavar="FRACTION", help="hotset: share of the calls on hot keys (0.8)"
    )
    mix.add_argument(
        "--value-size", type=_size, default=100, metavar="BYTES", help="bytes of each value written (100)"
    )
    mix.add_argument("--preload", action="store_true", help="write every key once first, so Gets find them")
    mix.add_argument("--seed", type=int, metavar="N", help="random seed, for a repeatable run (random)")

    load = parser.add_argument_group("load")
    load.add_argument(
        "-c", "--concurrency", type=_count, default=64, metavar="N", help="calls in flight, in all (64)"
    )
    load.add_argument(
        "--connections",
        type=_count,
        metavar="N",
        help="gRPC: HTTP/2 connections, in all (4); REST: always one per call in flight",
    )
    until = load.add_mutually_exclusive_group()
    until.add_argument(
        "-d", "--duration", type=_seconds, metavar="SECONDS", help="measure for this long (10, the default)"
    )
    until.add_argument("-n", "--ops", type=_count, metavar="N", help="measure this many calls instead")
    load.add_argument(
        "--warmup", type=_seconds, default=0.0, metavar="SECONDS", help="load, unmeasured, before (0)"
    )
    load.add_argument(
        "-p", "--processes", type=_count, default=1, metavar="N", help="worker processes sharing the load (1)"
    )
    load.add_argument(
        "--rest", metavar="URL", help="load the REST gateway at URL (http://127.0.0.1:8080) instead of gRPC"
    )
    parser.set_defaults(bench=lambda args, tls: run(parser, args, tls))


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The run, validated: what every worker's WorkerConfig derives from."""

    base: WorkerConfig  # the whole run's numbers (concurrency, connections, ops in all)
    processes: int
    seed: int

    def workers(self) -> list[WorkerConfig]:
        """The load split evenly: the first workers take one more when it does not divide."""
        base, n = self.base, self.processes

        def share(total: int, index: int) -> int:
            return total // n + (1 if index < total % n else 0)

        return [
            replace(
                base,
                concurrency=share(base.concurrency, i),
                connections=share(base.connections, i),
                ops=None if base.ops is None else share(base.ops, i),
                worker=i,
                workers=n,
                seed=self.seed + i,
            )
            for i in range(n)
        ]


class UsageError(Exception):
    """A bad combination of options."""


class Interrupted(Exception):
    """Ctrl-C before the load started."""


def settings_from(args: argparse.Namespace, tls: Tls | bool) -> Settings:
    """Check the options together; a UsageError names the option and what it must be."""
    hotset = args.distribution == "hotset"
    if not hotset and (args.hot_keys is not None or args.hot_ops is not None):
        raise UsageError("--hot-keys and --hot-ops go with --distribution hotset")
    hot_share = 0.2 if args.hot_keys is None else args.hot_keys
    if hotset and hot_share == 0:
        raise UsageError("--hot-keys must be more than 0")
    hot_keys = max(1, round(args.keys * hot_share)) if hotset else args.keys
    processes = args.processes
    if processes > MAX_PROCESSES:
        raise UsageError(f"--processes must be at most {MAX_PROCESSES}")
    if args.concurrency > MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be at most {MAX_CONCURRENCY:,}")
    if args.concurrency < processes:
        raise UsageError(f"--concurrency ({args.concurrency}) must be at least --processes ({processes})")
    try:
        args.key_prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--key-prefix must be valid UTF-8") from None

    if args.rest is not None:
        target, address = "rest", _rest_url(args.rest)
        if args.connections is not None and args.connections != args.concurrency:
            raise UsageError(
                "with --rest every call in flight has its own HTTP/1.1 connection: "
                "leave --connections out (or make it equal --concurrency)"
            )
        connections = args.concurrency
    else:
        target, address = "grpc", args.address
        connections = args.connections or min(args.concurrency, max(4, processes))
        if connections > args.concurrency:
            raise UsageError(
                f"--connections ({connections}) must be at most --concurrency ({args.concurrency}): "
                "a connection without a call in flight adds nothing"
            )
        if connections < processes:
            raise UsageError(f"--connections ({connections}) must be at least --processes ({processes})")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    tls_files = isinstance(tls, Tls)
    base = WorkerConfig(
        target=target,
        address=address,
        reads=args.reads,
        keys=args.keys,
        key_prefix=args.key_prefix,
        hot_keys=hot_keys,
        hot_ops=(0.8 if args.hot_ops is None else args.hot_ops) if hotset else 0.0,
        value_size=args.value_size,
        concurrency=args.concurrency,
        connections=connections,
        ops=args.ops,
        duration=None if args.ops is not None else (10.0 if args.duration is None else args.duration),
        warmup=args.warmup,
        preload=args.preload,
        worker=0,
        workers=processes,
        seed=seed,
        timeout=args.timeout,
        token=args.token,
        tls=bool(tls),
        tls_ca=args.tls_ca if tls_files else None,
        tls_cert=args.tls_cert if tls_files else None,
        tls_key=args.tls_key if tls_files else None,
        tls_server_name=args.tls_server_name if tls_files else None,
    )
    if base.duration is not None and base.duration <= 0:
        raise UsageError("--duration must be more than 0 seconds")
    return Settings(base, processes, seed)


def _rest_url(text: str) -> str:
    url = urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError(
            f"--rest must be an http:// or https:// URL such as http://127.0.0.1:8080, not {text!r}"
        )
    try:
        url.port  # noqa: B018 - parses the port: raises ValueError when it is not a number
    except ValueError:
        raise UsageError(f"--rest has a bad port: {text!r}") from None
    if url.query or url.fragment:
        raise UsageError(f"--rest must not have a query or a fragment: {text!r}")
    return text


# --------------------------------------------------------------------------- workers


@dataclass
class Snapshot:
    phase: str = "connecting"
    done: int = 0
    failed: int = 0


class Handle(Protocol):
    """One worker, in this process or a child, as the parent drives it."""

    def snapshot(self) -> Snapshot: ...

    async def prepare(self) -> None: ...  # connect and preload; raises Fatal

    def go(self) -> None: ...

    async def result(self) -> WorkerResult: ...

    def stop(self) -> None: ...

    async def abort(self) -> None: ...


class LocalWorker:
    """The worker in this process (``--processes 1``)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = Worker(config)
        self.task: asyncio.Future[WorkerResult] | None = None

    def snapshot(self) -> Snapshot:
        return Snapshot(self.worker.phase, self.worker.done, self.worker.failed)

    async def prepare(self) -> None:
        await self.worker.open()
        await self.worker.preload()

    def go(self) -> None:
        self.task = asyncio.ensure_future(self.worker.run())

    async def result(self) -> WorkerResult:
        assert self.task is not None  # noqa: S101 - go() comes first
        try:
            return await self.task
        finally:
            await self.worker.close()

    def stop(self) -> None:
        self.worker.stop()

    async def abort(self) -> None:
        self.worker.stop()
        await self.worker.close()


class ChildWorker:
    """A worker process running ``_loadgen.child_main``, JSON lines both ways."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.state = Snapshot()
        self.outcome: asyncio.Future[WorkerResult] | None = None

    def snapshot(self) -> Snapshot:
        return self.state

    async def _message(self) -> dict[str, Any]:
        assert self.process is not None  # noqa: S101 - prepare() started it
        assert self.process.stdout is not None  # noqa: S101
        while True:
            line = await self.process.stdout.readline()
            if not line:
                status = await self.process.wait()
                raise Fatal(f"worker process {self.config.worker + 1} exited with status {status}")
            message: dict[str, Any] = json.loads(line)
            if "progress" in message:
                self.state = Snapshot(**message["progress"])
                continue
            if "fatal" in message:
                raise Fatal(str(message["fatal"]))
            return message

    async def prepare(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            # Not `-m kvclient.cli._loadgen`: the package imports that module first (runpy warns).
            "import sys; from kvclient.cli._loadgen import child_main; sys.exit(child_main())",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdin is not None  # noqa: S101
        self.process.stdin.write(json.dumps(asdict(self.config)).encode() + b"\n")
        if "ready" not in await self._message():
            raise Fatal(f"worker process {self.config.worker + 1} did not get ready")

    def go(self) -> None:
        assert self.process is not None  # noqa: S101
        assert self.process.stdin is not None  # noqa: S101
        self.process.stdin.write(b"go\n")

        async def collect() -> WorkerResult:
            message = await self._message()
            assert self.process is not None  # noqa: S101
            await self.process.wait()
            return WorkerResult.from_json(message["result"])

        self.outcome = asyncio.ensure_future(collect())

    async def result(self) -> WorkerResult:
        assert self.outcome is not None  # noqa: S101 - go() comes first
        return await self.outcome

    def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def abort(self) -> None:
        if self.process is not None:
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What the parent saw: the workers' results, and the machine's CPU over the run."""

    results: list[WorkerResult]
    machine_busy: float | None
    interrupted: bool


def _machine_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies of every CPU from /proc/stat (Linux), else None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class ProgressBar:
    """One line on standard error, redrawn in place: phase, calls, current rate, errors."""

    def __init__(self, settings: Settings, stream: Any) -> None:
        self.base = settings.base
        self.stream = stream
        self.samples: deque[tuple[float, int]] = deque(maxlen=8)
        self.measuring_since: float | None = None

    def line(self, snap: Snapshot, now: float) -> str:
        base = self.base
        if snap.phase in ("connecting", "ready"):
            return "kv bench: connecting"
        if snap.phase == "preloading":
            return f"kv bench: preloading {snap.done:,}/{base.keys:,} keys"
        if snap.phase == "warmup":
            return f"kv bench: warming up ({base.warmup:g} s), {snap.done:,} calls"
        if self.measuring_since is None:
            self.measuring_since = now
            self.samples.clear()
        self.samples.append((now, snap.done))
        first_t, first_n = self.samples[0]
        rate = (snap.done - first_n) / (now - first_t) if now > first_t else 0.0
        if base.ops is not None:
            share = snap.done / base.ops
        else:
            share = (now - self.measuring_since) / (base.duration or 1.0)
        share = min(max(share, 0.0), 1.0)
        width = 24
        bar = "#" * round(share * width) + "-" * (width - round(share * width))
        errors = f", {snap.failed:,} errors" if snap.failed else ""
        return f"kv bench: [{bar}] {share:4.0%}  {snap.done:,} calls  {rate:,.0f}/s{errors}"

    def draw(self, snap: Snapshot) -> None:
        self.stream.write("\r" + self.line(snap, time.monotonic()) + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def _combined(handles: Sequence[Handle]) -> Snapshot:
    snaps = [h.snapshot() for h in handles]
    order = ["connecting", "preloading", "ready", "warmup", "measuring", "done"]

    def rank(snap: Snapshot) -> int:
        return order.index(snap.phase) if snap.phase in order else 0

    # The least advanced worker names the phase (workers start measuring together); a worker
    # that is done keeps its count.
    least = min(rank(snap) for snap in snaps)
    return Snapshot(order[least], sum(s.done for s in snaps), sum(s.failed for s in snaps))


async def drive(settings: Settings, progress: ProgressBar | None) -> Run:
    """Start the workers, preload, run them together, and gather what they measured."""
    configs = settings.workers()
    handles: list[Handle] = (
        [LocalWorker(configs[0])] if settings.processes == 1 else [ChildWorker(c) for c in configs]
    )
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        for handle in handles:
            handle.stop()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' loop
        loop.add_signal_handler(signal.SIGINT, interrupt)

    async def draw(bar: ProgressBar) -> None:
        while True:
            bar.draw(_combined(handles))
            await asyncio.sleep(0.25)

    drawer = asyncio.ensure_future(draw(progress)) if progress is not None else None
    machine: list[tuple[int, int] | None] = [None]

    async def sample_machine() -> None:
        await asyncio.sleep(settings.base.warmup)
        machine[0] = _machine_cpu()

    try:
        prepared = await asyncio.gather(*(h.prepare() for h in handles), return_exceptions=True)
        failures = [p for p in prepared if isinstance(p, BaseException)]
        if failures:
            for handle in handles:
                await handle.abort()
            if interrupted:  # a worker stopped while it started: nothing to report
                raise Interrupted
            raise next((f for f in failures if isinstance(f, Fatal)), failures[0])
        for handle in handles:
            handle.go()
        sampler = asyncio.ensure_future(sample_machine())
        try:
            results = list(await asyncio.gather(*(h.result() for h in handles)))
        except BaseException:
            for handle in handles:
                await handle.abort()
            raise
        sampler.cancel()
        end = _machine_cpu()
    finally:
        if drawer is not None:
            drawer.cancel()
        if progress is not None:
            progress.clear()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    start = machine[0]
    busy = None
    if start is not None and end is not None and end[1] > start[1]:
        busy = (end[0] - start[0]) / (end[1] - start[1])
    return Run(results, busy, interrupted or any(r.interrupted for r in results))


# --------------------------------------------------------------------------- the report


def _latency(histogram: Histogram, seconds: float) -> dict[str, Any]:
    def ms(micros: float) -> float:
        return round(micros / 1000, 3)

    return {
        "count": histogram.count,
        "per_second": round(histogram.count / seconds, 1) if seconds > 0 else 0.0,
        "min_ms": ms(histogram.min),
        "mean_ms": ms(histogram.total / histogram.count) if histogram.count else 0.0,
        "p50_ms": ms(histogram.percentile(0.50)),
        "p90_ms": ms(histogram.percentile(0.90)),
        "p99_ms": ms(histogram.percentile(0.99)),
        "max_ms": ms(histogram.max),
    }


def report(settings: Settings, run: Run) -> dict[str, Any]:
    """The JSON report (its fields are described in USAGE.md, "kv bench")."""
    base, results = settings.base, run.results
    gets, puts = Histogram(), Histogram()
    errors: dict[str, int] = {}
    for result in results:
        gets.merge(result.gets)
        puts.merge(result.puts)
        for code, n in result.errors.items():
            errors[code] = errors.get(code, 0) + n
    both = Histogram()
    both.merge(gets)
    both.merge(puts)
    measured = [r for r in results if r.finished > r.started]
    seconds = max((r.finished for r in measured), default=0.0) - min(
        (r.started for r in measured), default=0.0
    )
    failed = sum(errors.values())
    misses = sum(r.misses for r in results)
    loop_shares = [r.loop_cpu / (r.finished - r.started) if r.finished > r.started else 0.0 for r in results]
    busiest = max(loop_shares, default=0.0)
    bottleneck = busiest >= BOTTLENECK_LOOP_SHARE
    warnings = []
    if bottleneck:
        worst = loop_shares.index(busiest) + 1
        who = "its event loop" if settings.processes == 1 else f"the event loop of worker process {worst}"
        warnings.append(
            f"the load tester was the bottleneck: {who} was busy {busiest:.0%} of the time and a "
            f"Python process uses at most one core; run with --processes {settings.processes + 1} "
            "or more (or from another machine) to load the server harder"
        )
    if run.machine_busy is not None and run.machine_busy >= MACHINE_BUSY:
        warnings.append(
            f"the machine's CPUs were {run.machine_busy:.0%} busy: if the server runs here too, "
            "kv bench and the server competed for them"
        )
    if misses:
        warnings.append(f"{misses:,} Gets found no key (not failures); --preload writes every key first")
    if run.interrupted:
        warnings.append("interrupted: the figures cover the calls made before Ctrl-C")
    return {
        "target": base.target,
        "address": base.address,
        "settings": {
            "reads": base.reads,
            "keys": base.keys,
            "key_prefix": base.key_prefix,
            "distribution": "hotset" if base.hot_keys < base.keys else "uniform",
            "hot_keys": base.hot_keys if base.hot_keys < base.keys else None,
            "hot_ops": base.hot_ops if base.hot_keys < base.keys else None,
            "value_size": base.value_size,
            "concurrency": base.concurrency,
            "connections": base.connections,
            "processes": settings.processes,
            "duration_s": base.duration,
            "ops": base.ops,
            "warmup_s": base.warmup,
            "preload": base.preload,
            "seed": settings.seed,
            "timeout_s": base.timeout,
        },
        "preloaded": sum(r.preloaded for r in results),
        "preload_s": round(max((r.preload_seconds for r in results), default=0.0), 3),
        "duration_s": round(seconds, 3),
        "ops": both.count + failed,
        "errors": failed,
        "errors_by_code": dict(sorted(errors.items())),
        "misses": misses,
        "throughput": round(both.count / seconds, 1) if seconds > 0 else 0.0,
        "latency": {
            "get": _latency(gets, seconds),
            "put": _latency(puts, seconds),
            "all": _latency(both, seconds),
        },
        "client": {
            "event_loop": loop_name(),
            "cpu_cores": round(sum(r.cpu for r in results) / seconds, 3) if seconds > 0 else 0.0,
            "loop_busy": [round(share, 3) for share in loop_shares],
            "bottleneck": bottleneck,
        },
        "machine_cpu_busy": None if run.machine_busy is None else round(run.machine_busy, 3),
        "interrupted": run.interrupted,
        "warnings": warnings,
    }


def text_report(data: dict[str, Any]) -> list[str]:
    """The report for people: the run, a table of throughput and percentiles, the client's CPU."""
    s = data["settings"]
    target = "gRPC" if data["target"] == "grpc" else "REST"
    connections = f"{s['connections']} connection{'s' * (s['connections'] != 1)}"
    processes = f"{s['processes']} process{'es' * (s['processes'] != 1)}"
    dist = s["distribution"]
    if dist == "hotset":
        dist = f"hot set: {s['hot_ops']:.0%} of calls on {s['hot_keys']:,} keys"
    lines = [
        f"target    {target} {data['address']}, {s['concurrency']} calls in flight over {connections}, "
        f"{processes}",
        f"workload  {s['reads']:.0%} Get / {1 - s['reads']:.0%} Put, {s['keys']:,} keys under "
        f"{s['key_prefix']!r} ({dist}), {s['value_size']:,}-byte values, seed {s['seed']}",
    ]
    if s["preload"]:
        lines.append(f"preload   {data['preloaded']:,} keys written in {data['preload_s']:.2f} s")
    warm = f" after {s['warmup_s']:g} s of warm-up" if s["warmup_s"] else ""
    lines.append(
        f"measured  {data['ops']:,} calls in {data['duration_s']:.2f} s{warm}: "
        f"{data['throughput']:,.0f} calls/s succeeded"
    )
    if data["errors"]:
        codes = ", ".join(f"{code} {n:,}" for code, n in data["errors_by_code"].items())
        lines.append(f"errors    {data['errors']:,} ({codes})")
    else:
        lines.append("errors    none")
    if data["misses"]:
        lines.append(f"misses    {data['misses']:,} Gets of keys that do not exist")
    header = ["", "calls", "calls/s", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    rows = [header]
    for name, label in (("get", "Get"), ("put", "Put"), ("all", "all")):
        lat = data["latency"][name]
        rows.append(
            [
                label,
                f"{lat['count']:,}",
                f"{lat['per_second']:,.0f}",
                *(f"{lat[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    client = data["client"]
    loops = ", ".join(f"{share:.0%}" for share in client["loop_busy"])
    cpu = (
        f"client    {client['cpu_cores']:.2f} cores of CPU; event loop busy {loops} ({client['event_loop']})"
    )
    if data["machine_cpu_busy"] is not None:
        cpu += f"; machine {data['machine_cpu_busy']:.0%} busy"
    lines.append(cpu)
    return lines


# --------------------------------------------------------------------------- entry point


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, tls: Tls | bool) -> int:
    """``kv bench``: the exit status."""
    try:
        settings = settings_from(args, tls)
    except UsageError as error:
        parser.error(str(error))  # usage and "kv bench: error: ...", exit 2
    progress = ProgressBar(settings, sys.stderr) if sys.stderr.isatty() else None
    try:
        outcome = run_loop(drive(settings, progress))
    except Fatal as error:
        return _fail(str(error), EXIT_SERVER)
    except Interrupted:
        return _fail("interrupted before the load started", EXIT_INTERRUPTED)
    data = report(settings, outcome)
    if args.output == "json":
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        sys.stdout.write("\n".join(text_report(data)) + "\n")
    sys.stdout.flush()
    for warning in data["warnings"]:
        sys.stderr.write(f"kv bench: warning: {warning}\n")
    if data["errors"]:
        codes = ", ".join(f"{code} {n:,}" for code, n in data["errors_by_code"].items())
        return _fail(f"{data['errors']:,} of {data['ops']:,} calls failed ({codes})", EXIT_SERVER)
    return EXIT_INTERRUPTED if data["interrupted"] else EXIT_OK


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"kv: {message}\n")
    sys.stderr.flush()
    return status
