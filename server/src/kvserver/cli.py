"""`kv-server`: flags, environment variables and a config file become a Config; nothing else.

Precedence: command-line flag, then environment variable, then config file (TOML), then the
default in kvserver.config. Seed-style single-dash spellings (-port, -mode, -store_path,
-cache_capacity) are accepted too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from dataclasses import dataclass, replace
from typing import Any

import uvloop

from kvserver.config import Config, HistoryRetention, Limits, WatchSettings
from kvserver.server import serve


@dataclass(frozen=True)
class Setting:
    """One setting: its flag(s), environment variable, config-file key and where it goes."""

    flags: tuple[str, ...]
    env: str
    path: tuple[str, ...]  # ("port",) or ("limits", "max_key_bytes")
    type: type
    help: str
    choices: tuple[str, ...] | None = None


SETTINGS = [
    Setting(("--host",), "KV_HOST", ("host",), str, "address to listen on"),
    Setting(("--port", "-port"), "KV_PORT", ("port",), int, "gRPC port (0 picks a free one)"),
    Setting(("--store",), "KV_STORE", ("store",), str, "storage backend", ("sqlite", "memory", "etcd")),
    Setting(("--store-path", "-store_path"), "KV_STORE_PATH", ("store_path",), str, "SQLite database file"),
    Setting(("--sync",), "KV_SYNC", ("sync",), str, "SQLite durability (see README)", ("full", "normal")),
    Setting(
        ("--cache-capacity", "-cache_capacity"),
        "KV_CACHE_CAPACITY",
        ("cache_capacity",),
        int,
        "keys in the LRU read cache of the sqlite store (0 disables it)",
    ),
    Setting(("--max-key-bytes",), "KV_MAX_KEY_BYTES", ("limits", "max_key_bytes"), int, "largest key"),
    Setting(
        ("--max-value-bytes",), "KV_MAX_VALUE_BYTES", ("limits", "max_value_bytes"), int, "largest value"
    ),
    Setting(
        ("--default-page-size",), "KV_DEFAULT_PAGE_SIZE", ("limits", "default_page_size"), int, "List default"
    ),
    Setting(("--max-page-size",), "KV_MAX_PAGE_SIZE", ("limits", "max_page_size"), int, "List maximum"),
    Setting(
        ("--history-max-events",),
        "KV_HISTORY_MAX_EVENTS",
        ("history", "max_events"),
        int,
        "events of history kept for Watch and listings",
    ),
    Setting(
        ("--history-max-age",),
        "KV_HISTORY_MAX_AGE",
        ("history", "max_age_s"),
        float,
        "seconds of history kept for Watch and listings",
    ),
    Setting(
        ("--watch-progress-interval-ms",),
        "KV_WATCH_PROGRESS_INTERVAL_MS",
        ("watch", "progress_interval_ms"),
        int,
        "default interval of watch progress messages",
    ),
    Setting(
        ("--watch-buffer-events",),
        "KV_WATCH_BUFFER_EVENTS",
        ("watch", "buffer_events"),
        int,
        "pending events after which a slow watch stream is ended",
    ),
    Setting(
        ("--shutdown-grace",), "KV_SHUTDOWN_GRACE", ("shutdown_grace_s",), float, "seconds to drain on stop"
    ),
    Setting(("--log-format",), "KV_LOG_FORMAT", ("log_format",), str, "log line format", ("text", "json")),
    Setting(
        ("--log-level",),
        "KV_LOG_LEVEL",
        ("log_level",),
        str,
        "log level",
        ("DEBUG", "INFO", "WARNING", "ERROR"),
    ),
    Setting(
        ("--etcd-endpoints",),
        "KV_ETCD_ENDPOINTS",
        ("etcd_endpoints",),
        str,
        "store etcd: the etcd members, host:port,host:port (the local member first)",
    ),
    Setting(
        ("--etcd-prefix",), "KV_ETCD_PREFIX", ("etcd_prefix",), str, "store etcd: prefix of kv's keys in etcd"
    ),
    Setting(
        ("--page-token-secret",),
        "KV_PAGE_TOKEN_SECRET",
        ("page_token_secret",),
        str,
        "secret that signs List page tokens (default: random per process)",
    ),
    Setting(("--tls-cert",), "KV_TLS_CERT", ("tls_cert",), str, "TLS: the server's certificate chain (PEM)"),
    Setting(("--tls-key",), "KV_TLS_KEY", ("tls_key",), str, "TLS: the server's private key (PEM)"),
    Setting(
        ("--tls-client-ca",),
        "KV_TLS_CLIENT_CA",
        ("tls_client_ca",),
        str,
        "mutual TLS: CA certificates (PEM) that client certificates must be signed by",
    ),
    Setting(
        ("--auth-tokens",),
        "KV_AUTH_TOKENS",
        ("auth_tokens",),
        str,
        "TOML file of bearer tokens (SHA-256 hashes) and their roles; unset: no authentication",
    ),
    Setting(
        ("--max-watch-streams",),
        "KV_MAX_WATCH_STREAMS",
        ("watch", "max_streams"),
        int,
        "watch streams open at once; more are RESOURCE_EXHAUSTED (0: no limit)",
    ),
    Setting(
        ("--max-concurrent-streams",),
        "KV_MAX_CONCURRENT_STREAMS",
        ("max_concurrent_streams",),
        int,
        "concurrent calls on one client connection",
    ),
    Setting(
        ("--request-timeout",),
        "KV_REQUEST_TIMEOUT",
        ("request_timeout_s",),
        float,
        "seconds a unary call may run before it is DEADLINE_EXCEEDED (0: no limit)",
    ),
    Setting(("--metrics-host",), "KV_METRICS_HOST", ("metrics_host",), str, "address of the metrics port"),
    Setting(
        ("--metrics-port",), "KV_METRICS_PORT", ("metrics_port",), int, "Prometheus metrics port (0: off)"
    ),
]

_SECTIONS = {"limits": Limits, "history": HistoryRetention, "watch": WatchSettings}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv-server",
        description="Serve the kv.v1.KeyValue gRPC API over a SQLite (default) or in-memory store.",
        epilog="Example: kv-server --port 50051 --store sqlite --store-path ./data/kv.db",
    )
    parser.add_argument("--config", help="TOML file with settings (keys as in the README's table)")
    parser.add_argument(
        "--mode",
        "-mode",
        type=int,
        choices=(0, 1, 2),
        help="shorthand: 0 in-memory, 1 persistent, 2 persistent with cache",
    )
    for setting in SETTINGS:
        parser.add_argument(
            *setting.flags,
            dest="_".join(setting.path),
            type=setting.type,
            choices=setting.choices,
            default=None,
            help=f"{setting.help} (env {setting.env})",
        )
    return parser


def load_config(argv: list[str], environ: dict[str, str]) -> Config:
    args = build_parser().parse_args(argv)
    values: dict[tuple[str, ...], Any] = {}
    if args.config:
        with open(args.config, "rb") as file:
            document = tomllib.load(file)
        values.update(_from_document(document))
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.path] = _parse(setting, environ[setting.env])
        flag_value = getattr(args, "_".join(setting.path))
        if flag_value is not None:
            values[setting.path] = flag_value
    if args.mode is not None:
        values[("store",)] = "memory" if args.mode == 0 else "sqlite"
        if args.mode == 1:
            values[("cache_capacity",)] = 0
    return _apply(Config(), values)


def _parse(setting: Setting, raw: str) -> Any:
    value = setting.type(raw)
    if setting.choices and value not in setting.choices:
        raise SystemExit(f"kv-server: {setting.env}={raw!r} is not one of {', '.join(setting.choices)}")
    return value


def _from_document(document: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    known = {setting.path: setting for setting in SETTINGS}
    values: dict[tuple[str, ...], Any] = {}
    for key, value in document.items():
        items: list[tuple[tuple[str, ...], Any]] = [((key,), value)]
        if isinstance(value, dict):
            items = [((key, sub), sub_value) for sub, sub_value in value.items()]
        for path, item in items:
            if path not in known:
                raise SystemExit(f"kv-server: unknown setting {'.'.join(path)!r} in the config file")
            values[path] = _parse(known[path], str(item))
    return values


def _apply(config: Config, values: dict[tuple[str, ...], Any]) -> Config:
    top = {path[0]: value for path, value in values.items() if len(path) == 1}
    for section in _SECTIONS:
        nested = {path[1]: value for path, value in values.items() if len(path) == 2 and path[0] == section}
        if nested:
            top[section] = replace(getattr(config, section), **nested)
    return replace(config, **top)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> None:
    config = load_config(sys.argv[1:] if argv is None else argv, dict(os.environ))
    configure_logging(config)
    try:
        # uvloop: about a quarter more requests per second than asyncio's own loop, measured.
        uvloop.run(serve(config))
    except OSError as error:
        logging.getLogger("kvserver").error("cannot start: %s", error)
        raise SystemExit(1) from None
    except RuntimeError as error:  # grpc reports a port it cannot bind as RuntimeError
        logging.getLogger("kvserver").error("cannot start: %s", error)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
