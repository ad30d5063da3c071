"""h2load runs of gRPC unary calls with a pre-framed body, and what can be trusted of them.

h2load only sees HTTP: it counts a call as succeeded on HTTP 200 even when grpc-status is not 0.
A failed gRPC call comes back trailers-only, with no DATA, so `check_load` compares the response
bytes h2load received with what the calls must have brought.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.wire import BenchError

# A successful response must bring at least this share of the expected response bytes.
MIN_DATA_SHARE = 0.95


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
    offered_rps: float | None = None


@dataclass(frozen=True)
class Shape:
    """How h2load drives the server: -c clients, -m streams each, -t threads, --rps per client."""

    clients: int
    streams: int
    threads: int = 1
    rate: float | None = None  # total requests a second (spread over the clients), None: flat out

    def argv(self) -> list[str]:
        args = ["-c", str(self.clients), "-m", str(self.streams), "-t", str(self.threads)]
        if self.rate is not None:
            args.append(f"--rps={max(self.rate / self.clients, 0.1):g}")
        return args

    def describe(self) -> str:
        text = f"-c{self.clients} -m{self.streams} -t{self.threads}"
        if self.rate is not None:
            text += f" --rps={max(self.rate / self.clients, 0.1):g} ({self.rate:g} req/s)"
        return text


H2LOAD_PATTERNS = {
    "finished": re.compile(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s"),
    "requests": re.compile(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored"
    ),
    "status": re.compile(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx"),
    "traffic": re.compile(r"traffic: .*\((\d+)\) data"),
    "latency": re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)"),
}
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
    """The summary h2load prints."""
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


def run_h2load(
    h2load: str, url: str, body: Path, seconds: float, shape: Shape, log_file: Path | None
) -> LoadResult:
    """One fixed-duration h2load run of gRPC unary calls with the framed body."""
    argv = [h2load, "-D", f"{round(seconds * 1000)}ms", *shape.argv()]
    argv += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body), url]
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
    result.offered_rps = shape.rate
    if log_file is not None:
        add_percentiles(result, log_file)
    return result


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
