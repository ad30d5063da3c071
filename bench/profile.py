"""Profiles of kv-server while it is measured (run.py --profile).

`py-spy record --nonblocking --format raw` samples the server's Python stacks from outside (it
is not paused) and stops on SIGINT at the end of the measured run. The raw file (collapsed
stacks, one line per distinct stack with its sample count) is kept under bench/results/profiles/
and summarised: the share of samples by where the innermost Python frame lives (kvserver's
packages, asyncio, protobuf, sqlite's threads) and the top functions by self time. Time spent in
C under the event loop (uvloop, grpc's Cython layer and C-core, the kernel) has no Python frame
of its own: py-spy shows it as the loop's frame (`Runner.run`).

So when `perf` is installed, `perf record -F 499` samples the same process at the same time,
and its samples are summarised by thread name and shared object (libpython: the interpreter
running Python code; cygrpc: grpc; loop: uvloop; _message: protobuf; the kernel: system calls).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.systems import log

RATE_HZ = 250
TOP = 15
# Where a frame's file lives -> the group it counts in (first match wins).
GROUPS = [
    ("grpc", re.compile(r"grpc/|_cython|cygrpc")),
    ("kvserver.api", re.compile(r"kvserver/api/")),
    ("kvserver.service", re.compile(r"kvserver/service/")),
    ("kvserver.store", re.compile(r"kvserver/store/")),
    ("kvserver (other)", re.compile(r"kvserver/")),
    ("sqlitedict/sqlite3", re.compile(r"sqlitedict|sqlite3")),
    ("protobuf", re.compile(r"google/protobuf|protobuf")),
    ("asyncio/uvloop", re.compile(r"asyncio/|uvloop")),
    ("threading/queue", re.compile(r"threading\.py|queue\.py")),
]
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


class _Settings(Protocol):
    results_dir: Path


@dataclass
class Profile:
    path: Path
    summary: dict[str, Any] | None = field(default=None)


def group_of(frame: str) -> str:
    match = FRAME.match(frame)
    where = match.group("file") if match else frame
    for name, pattern in GROUPS:
        if pattern.search(where):
            return name
    return "other"


def short(frame: str) -> str:
    """`function (path/to/file.py:12)` -> `function (file.py)`."""
    match = FRAME.match(frame)
    if not match:
        return frame
    return f"{match.group('func')} ({Path(match.group('file')).name})"


def summarize(raw: Path) -> dict[str, Any]:
    """Shares of samples by group of the innermost frame, per thread kind, and the top self frames."""
    by_group: Counter[str] = Counter()
    by_self: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        thread = frames[0] if frames[0].startswith("process") or frames[0].startswith("thread") else ""
        total += count
        by_group[group_of(leaf)] += count
        by_self[short(leaf)] += count
        by_thread[
            "event loop" if any("run_forever" in f or "uvloop" in f for f in frames) else thread or "other"
        ] += count
    if not total:
        return {"samples": 0, "file": str(raw)}
    return {
        "samples": total,
        "file": str(raw),
        "by_group": {k: round(v / total, 3) for k, v in by_group.most_common()},
        "top_self": [[k, round(v / total, 3)] for k, v in by_self.most_common(TOP)],
    }


@contextlib.contextmanager
def maybe_profile(enabled: bool, pid: int, cfg: _Settings, label: str) -> Iterator[Profile | None]:
    """Record the process while the block runs (when enabled and py-spy is installed)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not enabled or not Path(pyspy).exists():
        if enabled:
            log("no profile: py-spy is not installed (bench/install-deps.sh installs it)")
        yield None
        return
    folder = cfg.results_dir / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}-kv-{label}.txt"
    argv = [pyspy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--nonblocking"]
    argv += ["--format", "raw", "--output", str(path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    perf = shutil.which("perf")
    perf_data = path.with_suffix(".perf.data")
    perf_proc = None
    if perf:
        perf_argv = [perf, "record", "-F", "499", "-p", str(pid), "-o", str(perf_data), "--quiet"]
        perf_proc = subprocess.Popen(perf_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = Profile(path)
    try:
        yield profile
    finally:
        for sampler in (proc, perf_proc):
            if sampler is not None:
                _interrupt(sampler)
        if path.exists():
            profile.summary = summarize(path)
            log(f"profile of kv {label}: {path}")
        else:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log(f"py-spy wrote no profile for {label}: {stderr[-500:]}")
        if perf and perf_data.exists():
            native = perf_summary(perf, perf_data)
            profile.summary = (profile.summary or {}) | {"native": native}
            perf_data.unlink()


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (the samplers write their output then), SIGKILL if it does not end in 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def perf_summary(perf: str, data: Path) -> dict[str, float]:
    """Shares of perf samples by "thread name / shared object", largest first (those >= 0.5%)."""
    argv = [perf, "report", "-i", str(data), "--sort", "comm,dso", "--stdio"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    shares: dict[str, float] = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^\s+([\d.]+)%\s+(\S+)\s+(\S+)", line)
        if match and float(match.group(1)) >= 0.5:
            dso = match.group(3).removesuffix(".cpython-311-x86_64-linux-gnu.so").strip("[]")
            shares[f"{match.group(2)} / {dso}"] = round(float(match.group(1)) / 100, 3)
    return shares
