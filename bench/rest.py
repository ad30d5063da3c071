"""REST: kv through Envoy's gRPC-JSON transcoder (gateway/envoy.yaml as `make run` renders it,
rate limit off), and etcd's own JSON gateway (/v3/kv/range), both driven by wrk (HTTP/1.1).

wrk runs a Lua script whose `done` prints one JSON line: requests, bytes, every error count and
the latency percentiles, so nothing is read off wrk's rounded human summary. Every response must
be a 2xx (`status` errors count the others) and bring at least the body a preflight request got.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.systems import log
from bench.wire import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = REPO_ROOT / "build" / "kv.pb"
MIN_BODY_SHARE = 0.95

_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    bytes_per_response: float
    connections: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def wrk_script(workdir: Path, name: str, method: str = "GET", body: str = "") -> Path:
    """A wrk Lua script: the request (method, JSON body) and the JSON report."""
    lines = [f'wrk.method = "{method}"']
    if body:
        lines += [f"wrk.body = {json.dumps(body)}", 'wrk.headers["Content-Type"] = "application/json"']
    path = workdir / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n" + _REPORT)
    return path


def run_wrk(wrk: str, url: str, script: Path, seconds: float, connections: int, min_body: int) -> WrkResult:
    """One wrk run (-t1, HTTP/1.1 keep-alive); fails on any error or short response."""
    # wrk takes whole seconds.
    argv = [wrk, "-t1", f"-c{connections}", f"-d{wrk_seconds(seconds)}s", "-s", str(script), url]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 60:g} s") from exc
    match = re.search(r"^WRKJSON (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise BenchError(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    report = json.loads(match.group(1))
    errors = {k: report[k] for k in ("connect", "read", "write", "status", "timeout") if report[k]}
    if errors or not report["requests"]:
        raise BenchError(f"wrk {url}: errors {errors} (status: non-2xx/3xx answers)\n{done.stdout}")
    per_response = report["bytes"] / report["requests"]
    if per_response < MIN_BODY_SHARE * min_body:
        raise BenchError(f"wrk {url}: {per_response:.0f} bytes per response, expected >= {min_body}")
    return WrkResult(
        requests_per_s=report["requests"] / (report["duration_us"] / 1e6),
        requests=report["requests"],
        p50_ms=report["p50_us"] / 1000,
        p90_ms=report["p90_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        mean_ms=report["mean_us"] / 1000,
        bytes_per_response=round(per_response, 1),
        connections=connections,
    )


def wrk_seconds(seconds: float) -> int:
    return max(1, round(seconds))


def http(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP request to a loopback URL (POST with a JSON body when given)."""
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"refusing a non-loopback URL {url!r}")
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 - loopback only
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return int(answer.status), bytes(answer.read())


# --------------------------------------------------------------------------- Envoy


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    address: str  # the REST listener, 127.0.0.1:port


def ensure_descriptor() -> None:
    """build/kv.pb, which the transcoder needs; built as `make descriptor` does if missing."""
    if DESCRIPTOR.exists():
        return
    log("building", DESCRIPTOR, "(make descriptor)")
    subprocess.run(
        [sys.executable, "scripts/generate.py", "--descriptor", str(DESCRIPTOR)],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
    )


def start_gateway(grpc_port: int, workdir: Path) -> Gateway:
    """Envoy in front of kv on free ports, as scripts/serve.py runs it, without the rate limit."""
    sys.path.insert(0, str(REPO_ROOT))
    from scripts.serve import envoy_command, render_gateway_config

    ensure_descriptor()
    config = render_gateway_config(grpc_port, 0, 0, workdir / "envoy.yaml", rate_limit=(0, 0))
    admin_file = workdir / "envoy-admin"
    argv = [*envoy_command(config), "--admin-address-path", str(admin_file)]
    log("starting envoy:", " ".join(argv))
    with (workdir / "envoy.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(300):  # 30 s
        time.sleep(0.1)
        if proc.poll() is not None:
            break
        admin = admin_file.read_text().strip() if admin_file.exists() else ""
        if not admin:
            continue
        try:
            _, listeners = http(f"http://{admin}/listeners?format=json")
        except OSError:
            continue
        match = re.search(rb'"port_value":\s*(\d+)', listeners)
        if match:
            return Gateway(proc, f"127.0.0.1:{int(match.group(1))}")
    tail = (workdir / "envoy.log").read_text(errors="replace")[-2000:]
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    raise BenchError(f"envoy did not come up:\n{tail}")


def etcd_range_body(key: str) -> str:
    """The JSON of etcd's gateway for a one-key Range (bytes are base64)."""
    return json.dumps({"key": base64.b64encode(key.encode()).decode()})
