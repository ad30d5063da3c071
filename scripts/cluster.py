"""Run a local kv cluster on loopback until Ctrl-C or SIGTERM, then stop every process it started.

    python scripts/cluster.py [--nodes 3] [--data-dir data/cluster] [--fresh] [--no-gateway]
                              [--no-front]

Node i (i = 1..N) is an etcd member (the N members form one Raft cluster), a `kv-server --store
etcd` that talks to its own member first and to the others when it fails, and an Envoy REST
gateway in front of that kv server. Ports, for node i:

    etcd client   2379 + 10000*(i-1)   (2379, 12379, 22379, ...)
    etcd peer     2380 + 10000*(i-1)
    kv gRPC       50051 + (i-1)
    REST          8080 + (i-1)
    Envoy admin   9901 + (i-1)

The bases change with --etcd-port, --grpc-port, --rest-port and --admin-port. One more Envoy, the
front gateway (REST and gRPC on 8000, admin on 9900: --front-port, --front-admin-port), balances
over all N kv servers, health-checks them over grpc.health.v1 and sends nothing to one that fails
its checks (--no-front: none). etcd's data and every log are in --data-dir (default
data/cluster): without --fresh a second run continues with the same data. Every kv server gets the
same page-token secret, so a listing started on one node continues on any other. The
`LocalCluster` class is what tests/cluster uses.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aetcd import rpc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for scripts.serve when run as `python scripts/cluster.py`

from scripts.serve import DESCRIPTOR, HealthCheck, envoy_command, render_gateway_config  # noqa: E402

BIN = Path(sys.executable).parent
_LISTENING = re.compile(r"listening on [^ ]+:(\d+)")
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05


@dataclass(frozen=True)
class NodePorts:
    etcd_client: int
    etcd_peer: int
    grpc: int
    rest: int
    admin: int


def standard_ports(
    nodes: int,
    *,
    etcd_port: int = 2379,
    grpc_port: int = 50051,
    rest_port: int = 8080,
    admin_port: int = 9901,
) -> list[NodePorts]:
    return [
        NodePorts(
            etcd_port + 10000 * i, etcd_port + 1 + 10000 * i, grpc_port + i, rest_port + i, admin_port + i
        )
        for i in range(nodes)
    ]


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` with its output appended to `log_path`, in a process group of its own, so
    that Ctrl-C reaches only this script, which then stops everything in order."""
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, process_group=0)


def _stop_process(process: subprocess.Popen[bytes] | None, *, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL) one process we started, by its PID, and reap it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(_STOP_TIMEOUT_S)


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, *, token: str) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is running")
        client_url = f"http://{self.endpoint}"
        command = [
            "etcd",
            *("--name", self.name, "--data-dir", str(self.data_dir)),
            *("--listen-client-urls", client_url, "--advertise-client-urls", client_url),
            *("--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url),
            *("--initial-cluster", initial_cluster, "--initial-cluster-token", token),
            *("--initial-cluster-state", "new"),  # ignored once the data directory exists
            *("--logger", "zap", "--log-level", "warn"),
        ]
        self.process = _spawn(command, self.log_path)

    def status(self, timeout: float = 1.0) -> tuple[int, int] | None:
        """(this member's id, its leader's id), or None if it does not answer."""
        with grpc.insecure_channel(self.endpoint) as channel:
            try:
                response = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout)
            except grpc.RpcError:
                return None
        return int(response.header.member_id), int(response.leader)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class KvNode:
    index: int
    ports: NodePorts
    endpoints: list[str]
    log_path: Path
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    _offset: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [
            str(BIN / "kv-server"),
            *("--host", "127.0.0.1", "--port", str(self.ports.grpc)),
            *("--store", "etcd", "--etcd-endpoints", ",".join(self.endpoints)),
            *self.extra_args,
        ]
        self._offset = offset
        self.process = _spawn(command, self.log_path)

    def wait_ready(self, deadline: float) -> None:
        while self.process is not None and time.monotonic() < deadline:
            if _LISTENING.search(self.log_path.read_bytes()[self._offset :].decode(errors="replace")):
                return
            if self.process.poll() is not None:
                break
            time.sleep(_POLL_S)
        raise RuntimeError(f"kv server {self.index} did not start; its log:\n{_tail(self.log_path)}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Gateway:
    index: int
    ports: NodePorts
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"envoy-{self.index}"

    @property
    def rest_port(self) -> int:
        return self.ports.rest

    def start(self) -> None:
        render_gateway_config(self.ports.grpc, self.ports.rest, self.ports.admin, self.config_path)
        self.process = _spawn(envoy_command(self.config_path), self.log_path)

    def ready(self) -> bool:
        return _envoy_ready(self.rest_port)

    def wait_ready(self, deadline: float) -> None:
        _wait_envoy_ready(self.name, self.process, self.rest_port, self.log_path, deadline)


@dataclass(frozen=True)
class FrontPorts:
    rest: int = 8000
    admin: int = 9900


@dataclass(frozen=True)
class UpstreamHost:
    """One kv server as the front gateway's admin interface (/clusters) sees it."""

    port: int
    health_flags: str  # "healthy", or "/failed_active_hc" and the like
    stats: dict[str, int]

    @property
    def healthy(self) -> bool:
        return self.health_flags == "healthy"

    @property
    def failed_active_hc(self) -> bool:
        return "failed_active_hc" in self.health_flags


@dataclass
class FrontGateway:
    """The Envoy in front of every kv server: REST and gRPC on `ports.rest`, balanced over all of
    `upstreams` (gRPC ports), each health-checked (`health_check`)."""

    ports: FrontPorts
    upstreams: Sequence[int]
    config_path: Path
    log_path: Path
    health_check: HealthCheck = field(default_factory=HealthCheck)
    process: subprocess.Popen[bytes] | None = None
    name = "envoy-front"

    @property
    def rest_port(self) -> int:
        return self.ports.rest

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.rest}"

    def start(self) -> None:
        render_gateway_config(
            self.upstreams[0],
            self.ports.rest,
            self.ports.admin,
            self.config_path,
            upstreams=self.upstreams,
            health_check=self.health_check,
        )
        self.process = _spawn(envoy_command(self.config_path), self.log_path)

    def ready(self) -> bool:
        return _envoy_ready(self.rest_port)

    def wait_ready(self, deadline: float) -> None:
        _wait_envoy_ready(self.name, self.process, self.rest_port, self.log_path, deadline)

    def hosts(self, timeout: float = 2.0) -> dict[int, UpstreamHost]:
        """Every upstream kv server by gRPC port: its health flags and Envoy's counters for it
        (rq_total, rq_success, rq_error, cx_connect_fail, ...), from the admin's /clusters."""
        connection = http.client.HTTPConnection("127.0.0.1", self.ports.admin, timeout=timeout)
        try:
            connection.request("GET", "/clusters")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        flags: dict[int, str] = {}
        stats: dict[int, dict[str, int]] = {}
        for line in text.splitlines():
            # kv_grpc::127.0.0.1:50052::health_flags::/failed_active_hc
            parts = line.split("::")
            if len(parts) != 4 or parts[0] != "kv_grpc" or ":" not in parts[1]:
                continue
            port = int(parts[1].rsplit(":", 1)[1])
            if parts[2] == "health_flags":
                flags[port] = parts[3]
            elif parts[3].isdigit():
                stats.setdefault(port, {})[parts[2]] = int(parts[3])
        return {port: UpstreamHost(port, flags[port], stats.get(port, {})) for port in flags}


@dataclass
class LocalCluster:
    """N etcd members, N kv servers over them, (optionally) N REST gateways, one per kv server,
    and (optionally, with `front`) the front gateway over all of them, on loopback."""

    directory: Path
    ports: list[NodePorts]
    gateways: bool = True
    kv_args: Sequence[str] = ()
    front: FrontPorts | None = None
    health_check: HealthCheck = field(default_factory=HealthCheck)
    members: list[EtcdMember] = field(default_factory=list)
    servers: list[KvNode] = field(default_factory=list)
    proxies: list[Gateway] = field(default_factory=list)
    front_proxy: FrontGateway | None = None

    def __post_init__(self) -> None:
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        secret_file = self.directory / "page-token-secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_hex(32))
            secret_file.chmod(0o600)
        secret = secret_file.read_text().strip()
        self.token = "kv-cluster-" + secret[:8]
        for i, ports in enumerate(self.ports, start=1):
            self.members.append(
                EtcdMember(
                    f"etcd-{i}",
                    ports.etcd_client,
                    ports.etcd_peer,
                    self.directory / f"etcd-{i}",
                    logs / f"etcd-{i}.log",
                )
            )
        endpoints = [member.endpoint for member in self.members]
        for i, ports in enumerate(self.ports):
            own_first = endpoints[i:] + endpoints[:i]  # its own member first: local reads stay local
            args = ["--page-token-secret", secret, *self.kv_args]
            self.servers.append(KvNode(i + 1, ports, own_first, logs / f"kv-{i + 1}.log", args))
            if self.gateways:
                self.proxies.append(
                    Gateway(i + 1, ports, self.directory / f"envoy-{i + 1}.yaml", logs / f"envoy-{i + 1}.log")
                )
        if self.front is not None:
            self.front_proxy = FrontGateway(
                self.front,
                [ports.grpc for ports in self.ports],
                self.directory / "envoy-front.yaml",
                logs / "envoy-front.log",
                self.health_check,
            )

    @property
    def envoys(self) -> list[Gateway | FrontGateway]:
        """The per-node gateways and the front gateway."""
        return [*self.proxies, *([self.front_proxy] if self.front_proxy is not None else [])]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{member.name}={member.peer_url}" for member in self.members)

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start everything and return once every node answers; stops what it started on failure."""
        deadline = time.monotonic() + timeout_s
        try:
            self.start_members(timeout_s)
            for server in self.servers:
                server.start()
            for server in self.servers:
                server.wait_ready(deadline)
            for proxy in self.envoys:
                proxy.start()
            for proxy in self.envoys:
                proxy.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def start_members(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start the etcd members only; return once they have a leader."""
        for member in self.members:
            member.start(self.initial_cluster, token=self.token)
        self.wait_for_leader(time.monotonic() + timeout_s)

    def wait_for_leader(self, deadline: float) -> int:
        """The index of the etcd leader, once the running members agree on one."""
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            time.sleep(_POLL_S)
        raise RuntimeError("the etcd members elected no leader; logs in " + str(self.directory / "logs"))

    def leader(self) -> int | None:
        """The index of the member that the running members name as leader (None if none)."""
        ids: dict[int, int] = {}
        leaders = set()
        for index, member in enumerate(self.members):
            if not member.alive():
                continue
            status = member.status()
            if status is None:
                return None
            ids[status[0]] = index
            leaders.add(status[1])
        if len(leaders) != 1:
            return None
        return ids.get(leaders.pop())

    def kill_member(self, index: int) -> None:
        _stop_process(self.members[index].process, kill=True)

    def restart_member(self, index: int) -> None:
        self.members[index].start(self.initial_cluster, token=self.token)

    def kill_server(self, index: int) -> None:
        _stop_process(self.servers[index].process, kill=True)

    def restart_server(self, index: int, timeout_s: float = _START_TIMEOUT_S) -> None:
        server = self.servers[index]
        server.start()
        server.wait_ready(time.monotonic() + timeout_s)

    def stop(self) -> None:
        """Gateways, then kv servers (they drain), then etcd: SIGTERM, by PID; SIGKILL if stuck.

        The etcd followers stop before the leader: a leader told to stop hands its leadership to
        a follower first, and waits 7 s for that if the followers are stopping at the same time.
        """
        leader = self.leader() if any(member.alive() for member in self.members) else None
        followers = [m for i, m in enumerate(self.members) if i != leader]
        last = [self.members[leader]] if leader is not None else []
        for group in (self.envoys, self.servers, followers, last):
            processes = [node.process for node in group]
            for process in processes:
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                _stop_process(process)

    def exited(self) -> list[str]:
        """Names of the processes that have exited since they were started."""
        named = [
            *((f"etcd-{i}", m.process) for i, m in enumerate(self.members, 1)),
            *((f"kv-{s.index}", s.process) for s in self.servers),
            *((p.name, p.process) for p in self.envoys),
        ]
        return [name for name, process in named if process is not None and process.poll() is not None]

    def describe(self) -> str:
        lines = ["node  etcd client       kv gRPC           REST                    Envoy admin"]
        for i, ports in enumerate(self.ports, start=1):
            rest = f"http://127.0.0.1:{ports.rest}" if self.gateways else "-"
            admin = f"127.0.0.1:{ports.admin}" if self.gateways else "-"
            lines.append(
                f"{i:<5} 127.0.0.1:{ports.etcd_client:<7} 127.0.0.1:{ports.grpc:<7} {rest:<23} {admin}"
            )
        if self.front is not None:
            lines.append(
                f"front gateway (REST and gRPC, over every kv server, health-checked): "
                f"http://127.0.0.1:{self.front.rest}, Envoy admin 127.0.0.1:{self.front.admin}"
            )
        lines.append(f"etcd endpoints: {','.join(member.endpoint for member in self.members)}")
        lines.append(f"data and logs: {self.directory}")
        return "\n".join(lines)


def _envoy_ready(rest_port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=2.0)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _wait_envoy_ready(
    name: str, process: subprocess.Popen[bytes] | None, rest_port: int, log_path: Path, deadline: float
) -> None:
    while process is not None and time.monotonic() < deadline and process.poll() is None:
        if _envoy_ready(rest_port):
            return
        time.sleep(_POLL_S)
    raise RuntimeError(f"{name} did not become ready; its log:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--nodes", type=int, default=int(os.environ.get("NODES", "3")), help="1 to 9 (default 3)"
    )
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "cluster")
    parser.add_argument("--fresh", action="store_true", help="delete --data-dir first")
    parser.add_argument("--no-gateway", action="store_true", help="no Envoy at all (no REST gateways)")
    parser.add_argument("--no-front", action="store_true", help="no front gateway over every kv server")
    parser.add_argument("--etcd-port", type=int, default=2379)
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--rest-port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("--front-port", type=int, default=8000, help="the front gateway's REST and gRPC")
    parser.add_argument("--front-admin-port", type=int, default=9900)
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 9:
        parser.error("--nodes must be between 1 and 9")
    if shutil.which("etcd") is None:
        print("cluster: etcd is not installed: apt-get install etcd-server etcd-client", file=sys.stderr)
        return 2
    if not args.no_gateway and not DESCRIPTOR.exists():
        print(f"cluster: {DESCRIPTOR} is missing: run `make descriptor` (or --no-gateway)", file=sys.stderr)
        return 2
    if args.fresh and args.data_dir.exists():
        shutil.rmtree(args.data_dir)
    existing = sorted(path.name for path in args.data_dir.glob("etcd-*") if path.is_dir())
    if existing and len(existing) != args.nodes:
        print(
            f"cluster: {args.data_dir} holds a {len(existing)}-member cluster: use --fresh", file=sys.stderr
        )
        return 2
    ports = standard_ports(
        args.nodes,
        etcd_port=args.etcd_port,
        grpc_port=args.grpc_port,
        rest_port=args.rest_port,
        admin_port=args.admin_port,
    )
    front = None if args.no_gateway or args.no_front else FrontPorts(args.front_port, args.front_admin_port)
    cluster = LocalCluster(args.data_dir, ports, gateways=not args.no_gateway, front=front)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(f"cluster: starting {args.nodes} nodes ...", file=sys.stderr)
    try:
        cluster.start()
    except RuntimeError as error:
        print(f"cluster: {error}", file=sys.stderr)
        return 1
    print(cluster.describe())
    print("cluster: running; Ctrl-C stops everything", file=sys.stderr, flush=True)
    reported: set[str] = set()
    while not stopping:
        for name in cluster.exited():
            if name not in reported:
                reported.add(name)
                print(f"cluster: {name} exited (log in {cluster.directory / 'logs'})", file=sys.stderr)
        time.sleep(0.2)
    print("cluster: stopping", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
