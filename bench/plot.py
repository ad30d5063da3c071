"""The latency-against-throughput plot (PNG), with matplotlib when it is installed.

matplotlib is a bench-only dependency (bench/requirements.txt): it is imported at run time, so
the harness runs, and type-checks, without it; the plot is then skipped with a message.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STYLE = {
    ("kv", "get"): ("kv Get", "tab:blue", "o"),
    ("kv", "put"): ("kv Put (durable)", "tab:blue", "s"),
    ("etcd", "get"): ("etcd Range", "tab:orange", "o"),
    ("etcd", "put"): ("etcd Put (durable)", "tab:orange", "s"),
}


@dataclass(frozen=True)
class Point:
    system: str
    operation: str
    throughput: float  # requests a second achieved
    p50_ms: float
    p99_ms: float


def load_pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def plot_latency(points: Sequence[Point], path: Path, title: str) -> bool:
    """p99 (solid) and p50 (dotted) latency against achieved throughput, log-log; False when
    matplotlib is missing or there is nothing to draw."""
    plt = load_pyplot()
    if plt is None or not points:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for (system, operation), (label, color, marker) in STYLE.items():
        series = sorted(
            (p for p in points if p.system == system and p.operation == operation), key=lambda p: p.throughput
        )
        if not series:
            continue
        xs = [p.throughput for p in series]
        linestyle = "-" if operation == "get" else "--"
        ax.plot(xs, [p.p99_ms for p in series], linestyle, color=color, marker=marker, label=f"{label} p99")
        ax.plot(
            xs, [p.p50_ms for p in series], ":", color=color, marker=marker, alpha=0.5, label=f"{label} p50"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput achieved (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
