"""Run kv-server and its REST gateway (Envoy) together until Ctrl-C or SIGTERM, then stop both.

    python scripts/serve.py [kv-server flags...]

Ports come from KV_PORT (gRPC, 50051), KV_REST_PORT (REST, 8080) and KV_ADMIN_PORT (Envoy's
admin, 9901); KV_HOST is where kv-server listens. gateway/envoy.yaml is used as written, with
only those ports substituted, from a copy in build/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATEWAY_CONFIG = ROOT / "gateway" / "envoy.yaml"
RENDERED_CONFIG = ROOT / "build" / "envoy.yaml"
DESCRIPTOR = ROOT / "build" / "kv.pb"
_STOP_TIMEOUT_S = 15.0


def render_gateway_config(grpc_port: int, rest_port: int, admin_port: int, out: Path) -> Path:
    """gateway/envoy.yaml with the three ports replaced and the descriptor path made absolute."""
    config: dict[str, Any] = yaml.safe_load(GATEWAY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = rest_port
    cluster = config["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = grpc_port
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for http_filter in manager["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
            http_filter["typed_config"]["proto_descriptor"] = str(DESCRIPTOR)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def envoy_command(config: Path) -> list[str]:
    # One worker thread: on a small machine a second one competes with kv-server for the CPU.
    # No hot restart: it needs a machine-wide shared-memory id, which a second Envoy (another
    # checkout, a test) would collide with.
    return [
        str(BIN / "envoy"),
        "-c",
        str(config),
        "--concurrency",
        "1",
        "--log-level",
        "warning",
        "--disable-hot-restart",
    ]


def main() -> int:
    grpc_port = int(os.environ.get("KV_PORT", "50051"))
    rest_port = int(os.environ.get("KV_REST_PORT", "8080"))
    admin_port = int(os.environ.get("KV_ADMIN_PORT", "9901"))
    if not DESCRIPTOR.exists():
        print(f"serve: {DESCRIPTOR} is missing: run `make descriptor` (or `make run`)", file=sys.stderr)
        return 2
    config = render_gateway_config(grpc_port, rest_port, admin_port, RENDERED_CONFIG)
    server = subprocess.Popen([str(BIN / "kv-server"), "--port", str(grpc_port), *sys.argv[1:]])
    gateway = subprocess.Popen(envoy_command(config))
    print(
        f"serve: gRPC on {os.environ.get('KV_HOST', '127.0.0.1')}:{grpc_port}, "
        f"REST on http://127.0.0.1:{rest_port}, Envoy admin on 127.0.0.1:{admin_port}; Ctrl-C stops both",
        file=sys.stderr,
    )
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stopping and server.poll() is None and gateway.poll() is None:
        time.sleep(0.2)
    status = 0 if stopping else 1
    for process in (gateway, server):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in (gateway, server):
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return status


if __name__ == "__main__":
    sys.exit(main())
