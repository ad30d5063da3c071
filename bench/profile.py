"""py-spy profiles of kv-server while it is measured (run.py --profile).

`py-spy record --nonblocking --format raw` samples the server from outside (it is not paused),
and stops on SIGINT at the end of the measured run. The raw file (collapsed stacks, one line
per distinct stack with its sample count) is kept under bench/results/profiles/, and summarised
here: the share of samples by where the innermost Python frame lives (grpc's Cython layer,
kvserver's packages, asyncio, protobuf, sqlite's threads) and the top functions by self time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import shutil
import signal
import subprocess
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
        by_thread["event loop" if any("run_forever" in f or "uvloop" in f for f in frames) else thread or "other"] += count
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
    pyspy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
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
    profile = Profile(path)
    try:
        yield profile
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if path.exists():
            profile.summary = summarize(path)
            log(f"profile of kv {label}: {path}")
        else:
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log(f"py-spy wrote no profile for {label}: {stderr[-500:]}")
