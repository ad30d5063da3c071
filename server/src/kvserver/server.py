"""Assembles the server (store, service, servicers, health, reflection) and runs its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvserver.api.auth import load_authority
from kvserver.api.compat import SERVICE_NAME as COMPAT_SERVICE_NAME
from kvserver.api.compat import CompatServicer
from kvserver.api.guard import Gate
from kvserver.api.reflection import enable_reflection
from kvserver.api.servicer import SERVICE_NAME, KeyValueServicer, ServerInfo
from kvserver.api.tls import exposure_warnings, server_credentials
from kvserver.config import Config
from kvserver.domain import wall_clock_ms
from kvserver.metrics import Metrics
from kvserver.service.kv import KvService
from kvserver.service.maintenance import Maintenance
from kvserver.service.pagination import PageTokens
from kvserver.service.watch import WatchHub
from kvserver.store.base import Store
from kvserver.store.cache import CachedStore
from kvserver.store.memory import MemoryStore
from kvserver.store.sqlite import SqliteStore
from kvserver.version import __version__

log = logging.getLogger(__name__)

_HEALTH_CHECK_EVERY_S = 2.0


async def open_store(config: Config) -> Store:
    if config.store == "memory":
        return MemoryStore()
    if config.store == "etcd":
        # Imported here so that the other stores do not need the etcd client installed. No read
        # cache: reads go to etcd, linearizable, whichever kv server made the last change.
        from kvserver.store.etcd import EtcdStore

        return await EtcdStore.open(config.etcd_endpoints, prefix=config.etcd_prefix)
    store: Store = await SqliteStore.open(config.store_path, sync=config.sync)
    if config.cache_capacity > 0:
        store = CachedStore(store, config.cache_capacity)
    return store


@dataclass
class RunningServer:
    """A started server. `stop()` drains it: health NOT_SERVING, watches ended, calls finished."""

    config: Config
    port: int
    store: Store
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    hub: WatchHub
    maintenance: Maintenance
    _health_task: asyncio.Task[None]
    metrics: Metrics | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        log.info("stopping: draining for up to %.1f s", grace)
        self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        self.hub.close()
        await self.grpc_server.stop(grace)
        await self.maintenance.stop()
        await self.store.close()
        if self.metrics is not None:
            await self.metrics.close()
        log.info("stopped")

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()


async def start(config: Config) -> RunningServer:
    # Settings that can be wrong are read before anything starts.
    credentials = server_credentials(config)
    authority = load_authority(config.auth_tokens)
    store = await open_store(config)
    hub = WatchHub(store, config.watch, config.limits)
    kv = KvService(store, config.limits, PageTokens(config.page_token_secret))
    message_limit = config.limits.max_value_bytes + config.limits.max_key_bytes + 64 * 1024
    server = grpc.aio.server(
        options=[
            # A second server on the same port must fail, not silently share it.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ]
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [SERVICE_NAME, COMPAT_SERVICE_NAME, health.SERVICE_NAME])
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    info = ServerInfo(__version__, f"{config.host}:{port}/{os.getpid()}", wall_clock_ms(), config.watch)
    metrics = Metrics() if config.metrics_port else None
    # Every kv.v1 and compat call passes the gate (tokens, deadline, metrics); health and
    # reflection do not: probes and tools reach them without a token.
    gate = Gate(authority, config.request_timeout_s, metrics)
    server.add_generic_rpc_handlers(
        (
            gate.wrap(KeyValueServicer(kv, hub, info).handler()),
            gate.wrap(CompatServicer(kv, config.limits.max_all_keys).handler()),
        )
    )
    if metrics is not None:
        metrics.watch_server(store, lambda: hub.active)
        metrics.serve(config.metrics_host, config.metrics_port)
    await server.start()
    maintenance = Maintenance(store, config.history)
    maintenance.start()
    health_task = asyncio.create_task(_track_health(store, health_servicer), name="health")
    log.info("listening on %s:%d (store=%s, version=%s)", config.host, port, store.name, __version__)
    log.info(
        "gRPC port %s, authentication %s",
        "with mutual TLS" if config.tls_client_ca else "with TLS" if credentials else "in plaintext",
        "by bearer token" if authority else "off",
    )
    for warning in exposure_warnings(config):
        log.warning(warning)
    return RunningServer(config, port, store, server, health_servicer, hub, maintenance, health_task, metrics)


async def _track_health(store: Store, servicer: health.aio.HealthServicer) -> None:
    """Reports SERVING while the store answers, NOT_SERVING while it does not."""
    serving: bool | None = None
    while True:
        try:
            async with asyncio.timeout(_HEALTH_CHECK_EVERY_S * 2):  # a hung store is unhealthy too
                await store.check()
            healthy = True
        except Exception as error:
            healthy = False
            if serving is not False:
                log.error("store health check failed: %s", error)
        if healthy != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)
            serving = healthy
        await asyncio.sleep(_HEALTH_CHECK_EVERY_S)


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    running = await start(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    waiter = asyncio.create_task(running.wait())
    stopper = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    await running.stop()
    waiter.cancel()
    stopper.cancel()
