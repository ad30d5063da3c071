"""Prometheus metrics on a port of their own (`--metrics-port`), for one server.

Calls are counted as the api's gate reports them (`observe`); the store's numbers are read when
Prometheus scrapes: the revision and key count, the read cache's hits and misses, and the
commits of the SQLite store, whose batch sizes and COMMIT latencies arrive through its
`commit_observers` callbacks. The store never imports this module, nor prometheus_client.

Each server has its own registry: several servers in one process (the tests) do not mix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvserver.store.base import Store

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# How long a scrape waits for the store's key count before it reports the last one it had.
_STATS_TIMEOUT_S = 2.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._handled = Counter(
            "kv_grpc_server_handled",
            "Calls finished, by service, method and status code (any code but OK is an error).",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "kv_grpc_server_handling_seconds",
            "Time the server took for a unary call, by service and method.",
            ["grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch = Histogram(
            "kv_store_commit_batch_writes",
            "Writes per committed transaction of the SQLite store (group commit).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self._commit = Histogram(
            "kv_store_commit_seconds",
            "Time of the SQLite COMMIT statement (the fsync of sync mode full).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http: Any = None
        self._thread: threading.Thread | None = None

    # The api's CallObserver.
    def observe(self, service: str, method: str, code: str, seconds: float | None) -> None:
        self._handled.labels(service, method, code).inc()
        if seconds is not None:
            self._latency.labels(service, method).observe(seconds)

    def _observe_commit(self, writes: int, seconds: float) -> None:
        self._batch.observe(writes)
        self._commit.observe(seconds)

    def watch_server(self, store: Store, watch_streams: Callable[[], int]) -> None:
        """Report `store` (and the layers under it) and the number of open watch streams. Call
        on the event loop that runs the store."""
        layers = list(_layers(store))
        for layer in layers:
            observers = getattr(layer, "commit_observers", None)
            if isinstance(observers, list):
                observers.append(self._observe_commit)
        self.registry.register(_ServerCollector(store, layers, watch_streams, asyncio.get_running_loop()))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (in a thread); returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    async def close(self) -> None:
        if self._http is not None:
            await asyncio.to_thread(self._http.shutdown)
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None


def _layers(store: Any) -> Iterator[Any]:
    """The store and the stores it wraps (the read cache wraps the SQLite store)."""
    seen = 0
    while store is not None and seen < 8:
        yield store
        store = getattr(store, "inner", None)
        seen += 1


class _ServerCollector(Collector):
    """The store's and the watch hub's numbers, read at scrape time (on the scraping thread)."""

    def __init__(
        self,
        store: Store,
        layers: list[Any],
        watch_streams: Callable[[], int],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._store = store
        self._layers = layers
        self._watch_streams = watch_streams
        self._loop = loop
        self._key_count = 0
        self._details: dict[str, int] = {}

    def _refresh_stats(self) -> None:
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # scraped from the loop's own thread: waiting would deadlock
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._store.stats(), self._loop)
            stats = future.result(_STATS_TIMEOUT_S)
        except (FutureTimeout, RuntimeError) as error:
            log.debug("metrics: store statistics unavailable: %s", error)
            return
        except Exception as error:  # a failing store: its health says so; report the last numbers
            log.debug("metrics: store statistics failed: %s", error)
            return
        self._key_count = stats.key_count
        self._details = dict(stats.details)

    def collect(self) -> Iterator[Any]:
        self._refresh_stats()
        yield GaugeMetricFamily("kv_store_revision", "The store's current revision.", self._store.revision)
        yield GaugeMetricFamily(
            "kv_store_compact_revision",
            "Events at or below this revision are discarded.",
            self._store.compact_revision,
        )
        yield GaugeMetricFamily("kv_store_keys", "Keys in the store.", self._key_count)
        if "file_bytes" in self._details:
            yield GaugeMetricFamily(
                "kv_store_file_bytes", "Size of the SQLite database file.", self._details["file_bytes"]
            )
        yield GaugeMetricFamily("kv_watch_streams_active", "Watch streams open now.", self._watch_streams())
        for layer in self._layers:
            if hasattr(layer, "hits") and hasattr(layer, "misses"):
                yield CounterMetricFamily("kv_cache_hits", "Reads the LRU cache answered.", layer.hits)
                yield CounterMetricFamily("kv_cache_misses", "Reads the LRU cache passed on.", layer.misses)
            if hasattr(layer, "batches") and hasattr(layer, "batched_writes"):
                yield CounterMetricFamily("kv_store_commits", "Transactions committed.", layer.batches)
                yield CounterMetricFamily(
                    "kv_store_committed_writes",
                    "Writes committed (in all transactions).",
                    layer.batched_writes,
                )
