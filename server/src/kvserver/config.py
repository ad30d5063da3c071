"""The server's configuration: the one place where defaults live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StoreKind = Literal["sqlite", "memory", "etcd"]
SyncMode = Literal["full", "normal"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = 4096
    max_value_bytes: int = 1024 * 1024
    default_page_size: int = 100
    max_page_size: int = 1000
    # A List page or a watch message stops growing past this many bytes of keys and values, so
    # responses stay under gRPC's default 4 MiB message limit of clients.
    max_response_bytes: int = 3 * 1024 * 1024
    # GET /all and GET /keys return every pair in one response, up to this many keys.
    max_all_keys: int = 10_000


@dataclass(frozen=True, slots=True)
class HistoryRetention:
    """Events are kept while both bounds allow: the newest `max_events`, and those younger than
    `max_age_s`. Watches and listings can start anywhere inside the retained history."""

    max_events: int = 100_000
    max_age_s: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class WatchSettings:
    progress_interval_ms: int = 5000
    # Events a stream may have pending before the server ends it as a slow consumer.
    buffer_events: int = 10_000
    # Watch streams open at once on this server; one more is RESOURCE_EXHAUSTED. 0: no limit.
    max_streams: int = 1000


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    store: StoreKind = "sqlite"
    store_path: str = "./data/kv.db"
    sync: SyncMode = "full"
    cache_capacity: int = 10_000
    limits: Limits = Limits()
    history: HistoryRetention = HistoryRetention()
    watch: WatchSettings = WatchSettings()
    shutdown_grace_s: float = 10.0
    log_format: LogFormat = "text"
    log_level: str = "INFO"
    # Signs List page tokens. Empty: a random secret per process (tokens end with the process).
    page_token_secret: str = ""
    # TLS on the gRPC port (PEM files). No certificate: plaintext. A client CA: mutual TLS, every
    # client must present a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer tokens with roles (TOML, see README "Security"). Empty: no authentication.
    auth_tokens: str = ""
    # Seconds a unary call may run on the server before it is DEADLINE_EXCEEDED. 0: no limit.
    request_timeout_s: float = 30.0
    # Concurrent calls (HTTP/2 streams) on one client connection; more wait for a free one.
    max_concurrent_streams: int = 1000
    # Prometheus metrics over HTTP at http://metrics_host:metrics_port/metrics. Port 0: off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # store "etcd" (cluster mode): the etcd members, "host:port,host:port", the local one first
    # (serializable reads go to the first that answers), and where kv's keys live in etcd.
    etcd_endpoints: str = "127.0.0.1:2379"
    etcd_prefix: str = "kv/"
