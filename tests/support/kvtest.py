"""Helpers for tests: real kv servers on ephemeral loopback ports (importable as `kvtest`)."""

from __future__ import annotations

import os
import re
import signal
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
