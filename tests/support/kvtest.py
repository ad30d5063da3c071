"""Helpers for tests: real kv servers on ephemeral loopback ports (importable as `kvtest`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from kvserver.config import Config

BIN = Path(sys.executable).parent
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_START_TIMEOUT_S = 30.0


class ServerProcess:
    """A `kv-server` process over a SQLite file in a test's temporary directory."""

    def __init__(self, directory: Path, *extra_args: str, store: str = "sqlite") -> None:
        self.directory = directory
        self.db_path = directory / "kv.db"
        self.log_path = directory / "server.log"
        self.extra_args = list(extra_args)
        self.store = store
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [
            str(BIN / "kv-server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--store",
            self.store,
            "--store-path",
            str(self.db_path),
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            match = _LISTENING.search(text)
            if match:
                self.port = int(match.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"kv-server did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush anything."""
        if self.process is not None:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        """Stop gracefully and start again on the same port and the same database file."""
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


STORE_CONFIGS: dict[str, dict[str, object]] = {
    "memory": {"store": "memory"},
    "sqlite": {"store": "sqlite", "cache_capacity": 0},
    "sqlite+cache": {"store": "sqlite", "cache_capacity": 1000},
}


def server_config(tmp_path: Path, store: str, **overrides: object) -> Config:
    settings: dict[str, object] = {**STORE_CONFIGS[store], "port": 0, "store_path": str(tmp_path / "kv.db")}
    settings.update(overrides)
    return replace(Config(), **settings)  # type: ignore[arg-type]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for tools that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class EtcdServer:
    """A fresh single-member etcd (Debian etcd-server) on free loopback ports in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.client_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("etcd") is not None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        log_path = self.directory / "etcd.log"
        for _ in range(5):  # a port taken between free_port() and etcd's bind: try others
            self.client_port, peer_port = free_port(), free_port()
            client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{peer_port}"
            command = [
                "etcd",
                *("--name", "kv-test", "--data-dir", str(self.directory / "etcd.data")),
                *("--listen-client-urls", client, "--advertise-client-urls", client),
                *("--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer),
                *("--initial-cluster", f"kv-test={peer}"),
                # A lone member elects itself at once with these; nothing else depends on them.
                *("--heartbeat-interval", "10", "--election-timeout", "100"),
                *("--logger", "zap", "--log-level", "error"),
            ]
            with log_path.open("ab") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
            try:
                if self._wait_ready(log_path):
                    return
            except BaseException:  # interrupted (a test timeout): leave nothing running
                self.stop()
                raise
            self.stop()
        raise RuntimeError(f"etcd did not start; its log:\n{log_path.read_text(errors='replace')}")

    def _wait_ready(self, log_path: Path) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.01)
                continue
            done = subprocess.run(  # noqa: S603
                ["etcdctl", "--endpoints", self.endpoint, "--command-timeout=1s", "endpoint", "health"],
                capture_output=True,
                check=False,
            )
            if done.returncode == 0:
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL if it lingers)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
