"""Run kv-server and its REST gateway (Envoy) together until Ctrl-C or SIGTERM, then stop both.

    python scripts/serve.py [kv-server flags...]

Ports come from KV_PORT (gRPC, 50051), KV_REST_PORT (REST, 8080) and KV_ADMIN_PORT (Envoy's
admin, 9901); KV_HOST is where kv-server listens. gateway/envoy.yaml is used as written, with
only those ports substituted, from a copy in build/, and these settings (README, Security):

    KV_REST_TLS_CERT, KV_REST_TLS_KEY   HTTPS on the REST port: Envoy terminates TLS
    KV_REST_RATE_LIMIT, ..._BURST       requests a second through the gateway (default 1000,
                                        bursts of twice that; 0: no limit); over it, 429
    KV_GATEWAY_TLS_CA                   when kv-server serves TLS (--tls-cert): the CA that
                                        signed its certificate, which must name
                                        KV_GATEWAY_TLS_SERVER_NAME (default localhost)
    KV_GATEWAY_TLS_CERT, ..._KEY        when kv-server asks for client certificates
                                        (--tls-client-ca): Envoy's own
"""

from __future__ import annotations

import copy
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATEWAY_CONFIG = ROOT / "gateway" / "envoy.yaml"
RENDERED_CONFIG = ROOT / "build" / "envoy.yaml"
DESCRIPTOR = ROOT / "build" / "kv.pb"
_STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class UpstreamTls:
    """How Envoy reaches a kv-server that serves TLS: `ca` verifies its certificate, which must
    name `server_name`; `cert` and `key` are Envoy's client certificate, for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str = "localhost"


@dataclass(frozen=True)
class HealthCheck:
    """Envoy's active health check of each upstream kv-server (grpc.health.v1, the server as a
    whole): every `interval_s`, an answer within `timeout_s`. A server is taken out at its first
    answer other than SERVING (NOT_SERVING: draining, or its etcd has no quorum), or after
    `unhealthy_threshold` checks in a row that got no answer (no connection, or `timeout_s`
    passed); it is put back after `healthy_threshold` SERVING answers in a row."""

    interval_s: float = 1.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2


def render_gateway_config(
    grpc_port: int,
    rest_port: int,
    admin_port: int,
    out: Path,
    *,
    rest_tls: tuple[Path, Path] | None = None,
    upstream_tls: UpstreamTls | None = None,
    rate_limit: tuple[int, int] | None = None,
    upstreams: Sequence[int] = (),
    health_check: HealthCheck | None = None,
) -> Path:
    """gateway/envoy.yaml with the three ports replaced and the descriptor path made absolute;
    with `rest_tls` (certificate, key) the REST listener serves HTTPS, with `upstream_tls` Envoy
    talks TLS to kv-server, and `rate_limit` (requests a second, burst) replaces the gateway's
    rate limit (a rate of 0 removes it).

    With `upstreams` (gRPC ports on the same host as `grpc_port`, which they replace) Envoy
    balances over all of those kv-servers, round robin, and retries a request on another one when
    that is safe (see _add_retries); with `health_check` too, it checks each of them and sends
    nothing to one that fails its checks."""
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
    if rest_tls is not None:
        listener["filter_chains"][0]["transport_socket"] = _downstream_tls(*rest_tls)
    if upstream_tls is not None:
        cluster["transport_socket"] = _upstream_tls(upstream_tls)
    if rate_limit is not None:
        _set_rate_limit(manager, *rate_limit)
    if upstreams:
        host = endpoint["address"]["socket_address"]["address"]
        _balance(cluster, host, upstreams, health_check)
        _add_retries(manager["route_config"]["virtual_hosts"][0], len(upstreams))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_RATE_LIMIT = "envoy.filters.http.local_ratelimit"


def _certificate(cert: Path, key: Path) -> dict[str, Any]:
    return {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}


def _downstream_tls(cert: Path, key: Path) -> dict[str, Any]:
    context = {"alpn_protocols": ["h2", "http/1.1"], "tls_certificates": [_certificate(cert, key)]}
    return {
        "name": _TLS_SOCKET,
        "typed_config": {"@type": _TLS_TYPES + "DownstreamTlsContext", "common_tls_context": context},
    }


def _upstream_tls(tls: UpstreamTls) -> dict[str, Any]:
    try:
        ipaddress.ip_address(tls.server_name)
        san_type, sni = "IP_ADDRESS", None
    except ValueError:
        san_type, sni = "DNS", tls.server_name
    context: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(tls.ca)},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": tls.server_name}}],
        },
    }
    if tls.cert is not None and tls.key is not None:
        context["tls_certificates"] = [_certificate(tls.cert, tls.key)]
    typed: dict[str, Any] = {"@type": _TLS_TYPES + "UpstreamTlsContext", "common_tls_context": context}
    if sni is not None:
        typed["sni"] = sni
    return {"name": _TLS_SOCKET, "typed_config": typed}


def _set_rate_limit(manager: dict[str, Any], per_second: int, burst: int) -> None:
    filters: list[dict[str, Any]] = manager["http_filters"]
    filters[:] = [http_filter for http_filter in filters if http_filter["name"] != _RATE_LIMIT]
    if per_second <= 0:
        return
    bucket = {"max_tokens": max(burst, 1), "tokens_per_fill": per_second, "fill_interval": "1s"}
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "rest_rate_limit",
        "token_bucket": bucket,
        "filter_enabled": {"runtime_key": "kv.rate_limit.enabled", **always},
        "filter_enforced": {"runtime_key": "kv.rate_limit.enforced", **always},
        "rate_limited_as_resource_exhausted": True,
    }
    filters.insert(0, {"name": _RATE_LIMIT, "typed_config": config})


def _balance(
    cluster: dict[str, Any], host: str, ports: Sequence[int], health_check: HealthCheck | None
) -> None:
    """The upstream cluster: every port in `ports`, round robin, health-checked if asked. No
    panic mode: while some servers pass their checks they take all the traffic, and when none
    does a request fails at once with UNAVAILABLE (503) instead of going to a dead server."""
    cluster["lb_policy"] = "ROUND_ROBIN"
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}}]}
        for p in ports
    ]
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0.0}}
    # Envoy lets 3 retries be in flight per cluster by default; a server's death makes every
    # request that was on its way there retry at once.
    cluster["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", "max_retries": 1024}]}
    if health_check is None:
        return
    interval = f"{health_check.interval_s:g}s"
    cluster["health_checks"] = [
        {
            "timeout": f"{health_check.timeout_s:g}s",
            "interval": interval,
            # An idle gateway checks as often as a busy one (Envoy's default is once a minute
            # until the cluster has seen traffic).
            "no_traffic_interval": interval,
            "unhealthy_threshold": health_check.unhealthy_threshold,
            "healthy_threshold": health_check.healthy_threshold,
            "grpc_health_check": {},
        }
    ]


# The RPCs that change nothing: Envoy may send them again, to another server, whatever happened
# to the first attempt. (Routes are matched on the gRPC path, also for transcoded REST requests.)
_READ_METHODS = (
    "/kv.v1.KeyValue/Get",
    "/kv.v1.KeyValue/GetValue",
    "/kv.v1.KeyValue/List",
    "/kv.v1.KeyValue/Status",
    "/kv.compat.v1.CompatService/Get",
    "/kv.compat.v1.CompatService/LocalRead",
    "/kv.compat.v1.CompatService/All",
    "/kv.compat.v1.CompatService/Health",
)
_WATCH_PREFIX = "/kv.v1.KeyValue/Watch"
# Every request: only failures where the request never reached a kv-server. connect-failure: no
# connection; refused-stream: HTTP/2 REFUSED_STREAM, which promises the server did not process
# it; reset-before-request: the stream was reset before Envoy had sent all of the request.
_SAFE_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# Reads, and watches until the server has sent its response headers: also a reset after the
# request went out (the server died mid-request) and UNAVAILABLE (a server draining or cut off
# from etcd). A write that fails so may have been applied: writes are never retried on these,
# the client decides.
_READ_RETRY_ON = "connect-failure,refused-stream,reset,unavailable"


def _retry_policy(retry_on: str, upstreams: int) -> dict[str, Any]:
    return {
        "retry_on": retry_on,
        "num_retries": max(1, min(3, upstreams - 1)),
        # Each retry goes to a server that this request has not tried yet.
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }


def _add_retries(virtual_host: dict[str, Any], upstreams: int) -> None:
    """The safe retries for every route (the virtual host's policy), the read retries for the
    routes of the read RPCs and of Watch (a route's own policy replaces the virtual host's)."""
    virtual_host["retry_policy"] = _retry_policy(_SAFE_RETRY_ON, upstreams)
    routes: list[dict[str, Any]] = virtual_host["routes"]
    catch_all = next(
        index for index, route in enumerate(routes) if route["match"] == {"prefix": "/", "grpc": {}}
    )
    reads = []
    for method in _READ_METHODS:
        route = copy.deepcopy(routes[catch_all])
        route["match"] = {"path": method, "grpc": {}}
        reads.append(route)
    routes[catch_all:catch_all] = reads
    for route in routes:
        if route["match"].get("path") in _READ_METHODS or route["match"].get("prefix") == _WATCH_PREFIX:
            route["route"]["retry_policy"] = _retry_policy(_READ_RETRY_ON, upstreams)


def gateway_settings(
    environ: dict[str, str], server_args: list[str]
) -> tuple[tuple[Path, Path] | None, UpstreamTls | None, tuple[int, int] | None]:
    """The REST TLS, upstream TLS and rate limit settings from the environment (see the module
    documentation), given the flags kv-server runs with. Raises ValueError when they are wrong."""
    rest_cert, rest_key = environ.get("KV_REST_TLS_CERT", ""), environ.get("KV_REST_TLS_KEY", "")
    if bool(rest_cert) != bool(rest_key):
        raise ValueError("KV_REST_TLS_CERT and KV_REST_TLS_KEY go together")
    rest_tls = (Path(rest_cert).resolve(), Path(rest_key).resolve()) if rest_cert else None
    rate_limit = None
    if environ.get("KV_REST_RATE_LIMIT"):
        per_second = int(environ["KV_REST_RATE_LIMIT"])
        rate_limit = (per_second, int(environ.get("KV_REST_RATE_BURST") or 2 * per_second))
    from kvserver.cli import load_config  # the settings kv-server itself will read

    server = load_config(server_args, environ)
    upstream = None
    if server.tls_cert:
        ca = environ.get("KV_GATEWAY_TLS_CA", "")
        if not ca:
            raise ValueError(
                "kv-server serves TLS: set KV_GATEWAY_TLS_CA to the CA that signed its certificate"
            )
        cert, key = environ.get("KV_GATEWAY_TLS_CERT", ""), environ.get("KV_GATEWAY_TLS_KEY", "")
        if server.tls_client_ca and not (cert and key):
            raise ValueError(
                "kv-server asks for client certificates: set KV_GATEWAY_TLS_CERT and KV_GATEWAY_TLS_KEY"
            )
        upstream = UpstreamTls(
            Path(ca).resolve(),
            Path(cert).resolve() if cert else None,
            Path(key).resolve() if key else None,
            environ.get("KV_GATEWAY_TLS_SERVER_NAME") or "localhost",
        )
    return rest_tls, upstream, rate_limit


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
    try:
        rest_tls, upstream_tls, rate_limit = gateway_settings(dict(os.environ), sys.argv[1:])
    except ValueError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 2
    config = render_gateway_config(
        grpc_port,
        rest_port,
        admin_port,
        RENDERED_CONFIG,
        rest_tls=rest_tls,
        upstream_tls=upstream_tls,
        rate_limit=rate_limit,
    )
    server = subprocess.Popen([str(BIN / "kv-server"), "--port", str(grpc_port), *sys.argv[1:]])
    gateway = subprocess.Popen(envoy_command(config))
    scheme = "https" if rest_tls else "http"
    print(
        f"serve: gRPC on {os.environ.get('KV_HOST', '127.0.0.1')}:{grpc_port}, "
        f"REST on {scheme}://127.0.0.1:{rest_port}, Envoy admin on 127.0.0.1:{admin_port}; Ctrl-C stops both",
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
