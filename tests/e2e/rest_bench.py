"""REST through Envoy against direct gRPC, on one machine, in one run (not a test).

    .venv/bin/python tests/e2e/rest_bench.py [--duration 10] [--store sqlite]

Starts kv-server (a fresh store) and Envoy with gateway/envoy.yaml (rendered as `make run` does,
without its rate limit, which would cap REST at 1000 requests a second), writes one key with a
100-byte value, then measures, each after a 2 s warm-up:

    wrk -t1 -c16|-c64 GET /v1/kv/<key> and GET /kv/<key>   (REST, HTTP/1.1, through Envoy)
    h2load -c16|-c64 -m1 and -c16 -m8 kv.v1.KeyValue/Get     (gRPC, straight to kv-server)
    h2load -c16 -m1 kv.v1.KeyValue/Get to Envoy's port      (gRPC through Envoy, no transcoding)

and the CPU each process used (from /proc), as cores busy over the run. Every run must answer
only 2xx with full bodies. Needs wrk and h2load (bench/install-deps.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from scripts.serve import envoy_command, render_gateway_config  # noqa: E402

from kv.v1 import kv_pb2, kv_pb2_grpc  # noqa: E402
from kvtest import ServerProcess  # noqa: E402

KEY = "bench/key/000001"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def measure(command: list[str], pids: dict[str, int], seconds: float) -> tuple[str, dict[str, float]]:
    """Run a load generator; its output and the cores each process kept busy meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)  # noqa: S603
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stdout}\n{done.stderr}")
    usage = {name: (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    usage[command[0]] = spent / wall
    return done.stdout, usage


def wrk(url: str, connections: int, seconds: float, pids: dict[str, int]) -> dict[str, object]:
    measure(["wrk", "-t1", f"-c{connections}", "-d2s", url], pids, 2)
    output, usage = measure(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url], pids, seconds
    )
    if "Non-2xx" in output or "Socket errors" in output:
        raise SystemExit(f"wrk saw errors:\n{output}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", output, re.MULTILINE))
    return {"req/s": rate, "p50": latency["50"], "p99": latency["99"], **usage}


def h2load(
    url: str, body: Path, clients: int, streams: int, seconds: float, pids: dict[str, int]
) -> dict[str, object]:
    command = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-H", "content-type: application/grpc"]
    command += ["-H", "te: trailers", "-d", str(body), url]
    measure([*command[:1], "-D", "2", *command[1:]], pids, 2)
    output, usage = measure([*command[:1], "-D", f"{seconds:g}", *command[1:]], pids, seconds)
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", output)
    assert done is not None, output
    if (
        int(done.group(2))
        or int(done.group(3))
        or not re.search(r"status codes: \d+ 2xx, 0 3xx, 0 4xx, 0 5xx", output)
    ):
        raise SystemExit(f"h2load saw errors:\n{output}")
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output).group(1))  # type: ignore[union-attr]
    # Every Get answer is one full gRPC message: a failed call (grpc-status only) has no data.
    data = int(re.search(r"traffic: .*\((\d+)\) data", output).group(1))  # type: ignore[union-attr]
    assert data >= int(done.group(1)) * 100, "calls failed with a grpc-status"
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
    return {"req/s": rate, "mean": mean.group(1) if mean else "?", **usage}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "memory"))
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        print(f"missing {missing}: run bench/install-deps.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kv-rest-bench-") as tmp:
        workdir = Path(tmp)
        server = ServerProcess(workdir, store=args.store)
        server.start()
        envoy: subprocess.Popen[bytes] | None = None
        try:
            admin_file = workdir / "admin"
            config = render_gateway_config(server.port, 0, 0, workdir / "envoy.yaml", rate_limit=(0, 0))
            with (workdir / "envoy.log").open("wb") as log:
                envoy = subprocess.Popen(  # noqa: S603
                    [*envoy_command(config), "--admin-address-path", str(admin_file)], stdout=log, stderr=log
                )
            rest = ""
            for _ in range(300):
                time.sleep(0.1)
                if admin_file.exists() and admin_file.read_text().strip():
                    admin = admin_file.read_text().strip()
                    listeners = subprocess.run(  # noqa: S603
                        ["curl", "-s", f"http://{admin}/listeners"],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout
                    match = re.search(r"127\.0\.0\.1:(\d+)", listeners)
                    if match:
                        rest = f"127.0.0.1:{match.group(1)}"
                        break
            assert rest, (workdir / "envoy.log").read_text()
            with grpc.insecure_channel(server.address) as channel:
                stub = kv_pb2_grpc.KeyValueStub(channel)
                stub.Put(kv_pb2.PutRequest(key=KEY, value_bytes=b"v" * 100), timeout=10)
            body = workdir / "get.grpc"
            message = kv_pb2.GetRequest(key=KEY).SerializeToString()
            body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
            assert server.process is not None
            pids = {"kv-server": server.process.pid, "envoy": envoy.pid}
            encoded = KEY.replace("/", "%2F")
            runs: list[tuple[str, Callable[[], dict[str, object]]]] = [
                (
                    "REST GET /v1/kv/<key> wrk -c16",
                    lambda: wrk(f"http://{rest}/v1/kv/{encoded}", 16, args.duration, pids),
                ),
                (
                    "REST GET /v1/kv/<key> wrk -c64",
                    lambda: wrk(f"http://{rest}/v1/kv/{encoded}", 64, args.duration, pids),
                ),
                (
                    "REST GET /kv/<key> wrk -c16",
                    lambda: wrk(f"http://{rest}/kv/{encoded}", 16, args.duration, pids),
                ),
                (
                    "REST GET /kv/<key> wrk -c64",
                    lambda: wrk(f"http://{rest}/kv/{encoded}", 64, args.duration, pids),
                ),
                (
                    "gRPC Get direct h2load -c16 -m1",
                    lambda: h2load(
                        f"http://{server.address}/kv.v1.KeyValue/Get", body, 16, 1, args.duration, pids
                    ),
                ),
                (
                    "gRPC Get direct h2load -c64 -m1",
                    lambda: h2load(
                        f"http://{server.address}/kv.v1.KeyValue/Get", body, 64, 1, args.duration, pids
                    ),
                ),
                (
                    "gRPC Get direct h2load -c16 -m8",
                    lambda: h2load(
                        f"http://{server.address}/kv.v1.KeyValue/Get", body, 16, 8, args.duration, pids
                    ),
                ),
                (
                    "gRPC Get via Envoy h2load -c16 -m1",
                    lambda: h2load(f"http://{rest}/kv.v1.KeyValue/Get", body, 16, 1, args.duration, pids),
                ),
            ]
            print(
                f"store={args.store} duration={args.duration:g}s "
                f"loadavg={os.getloadavg()[0]:.2f} cpus={os.cpu_count()}"
            )
            for name, run in runs:
                result = run()
                figures = "  ".join(
                    f"{key}={value:.2f}" if isinstance(value, float) and key != "req/s" else f"{key}={value}"
                    for key, value in result.items()
                )
                print(f"{name:38s} {figures}", flush=True)
        finally:
            if envoy is not None:
                envoy.terminate()
                envoy.wait(10)
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
