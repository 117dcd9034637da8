"""Builds and runs the grpc.aio gateway: service, health, reflection, TLS, limits, keepalive, metrics."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.config import GatewayConfig
from cloud.feature_bases import load_known_bases
from cloud.gateway.budget import MemoryBudget
from cloud.gateway.handlers import add_gateway_handlers
from cloud.gateway.metrics import GatewayMetrics
from cloud.gateway.servicer import DeviceGatewayServicer
from cloud.gateway.writer import GroupCommitWriter
from cloud.stores import open_stores
from cloud.updates import UpdateRecord
from common.errors import ConfigError
from common.signing import (
    Ed25519PrivateKey,
    generate_private_key,
    load_private_key,
    public_key_pem,
    save_private_key,
)
from protocol.tandem.v1 import gateway_pb2

log = logging.getLogger("tandem.gateway")
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["DeviceGateway"].full_name


def load_or_create_signing_key(config: GatewayConfig) -> Ed25519PrivateKey:
    """The cloud's update-signing key; created on first start when the config allows."""
    path = config.signing_key_path
    if not path.exists():
        if not config.create_signing_key:
            raise ConfigError(f"signing key not found: {path}")
        save_private_key(generate_private_key(), path)
        log.info("generated signing key %s", path)
    return load_private_key(path)


def server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """Channel arguments: message limits, keepalive, stream concurrency."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 0),
        # No bandwidth-delay probing: it grows each stream's receive window to many MiB, which gRPC then fills
        # with data of streams that wait for buffer room, outside the gateway's memory budget.
        ("grpc.http2.bdp_probe", 0),
    ]


def _server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    tls = config.tls
    if tls is None:
        return None
    for p in (tls.cert_file, tls.key_file, tls.client_ca_file):
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"TLS file not found: {p}")
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class GatewayServer:
    """A running gateway: ``await start()`` binds (``port`` 0 picks one), ``await stop()`` shuts down."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.port = 0
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        """Added before ``start`` (the simulator's call counter, cloud/simulated.py)."""
        self._server: grpc.aio.Server | None = None
        data_dir = Path(config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.signing_key = load_or_create_signing_key(config)
        stores = open_stores(config, data_dir, self.signing_key, config.sqlite_synchronous)
        self.samples, self.devices, self.updates = stores.samples, stores.devices, stores.updates
        self._unsubscribe = lambda: None
        self.writer: GroupCommitWriter | None = None
        self.servicer: DeviceGatewayServicer | None = None
        self.budget: MemoryBudget | None = None
        self._validator: ThreadPoolExecutor | None = None
        load_known_bases(config.adaptation)  # uploads in format /2 are checked on these

    @property
    def address(self) -> str:
        """``host:port`` the gateway listens on."""
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        self.writer = GroupCommitWriter(self.samples, self.metrics, self.config.commit_batch_bytes)
        self.writer.start()
        self.budget = MemoryBudget(self.config.max_buffered_bytes, self.config.buffer_wait_s)
        self._validator = ThreadPoolExecutor(self.config.validation_workers, thread_name_prefix="sample-verify")
        self.servicer = DeviceGatewayServicer(
            self.config,
            self.devices,
            self.writer,
            self.updates,
            public_key_pem(self.signing_key),
            self.metrics,
            self.budget,
            self._validator,
        )
        loop, servicer = asyncio.get_running_loop(), self.servicer
        self._unsubscribe = self.updates.subscribe(lambda: loop.call_soon_threadsafe(servicer.notify_published))
        server = grpc.aio.server(interceptors=self.interceptors, options=server_options(self.config))
        add_gateway_handlers(self.servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        bind = f"{self.config.host}:{self.config.port}"
        creds = _server_credentials(self.config)
        try:
            self.port = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind {bind}: {exc}") from exc
        await server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            self.metrics.serve_http(self.config.metrics_port, self.config.host)
        self._server = server
        log.info("gateway serving on %s (tls=%s)", self.address, creds is not None)
        return self.port

    def publish(
        self,
        device_id: str,
        base_version: str,
        target_version: str,
        payload: bytes,
        metadata: dict | None = None,
    ) -> UpdateRecord:
        """Publish an update for one device and wake its watchers."""
        record = self.updates.publish(device_id, base_version, target_version, payload, metadata)
        if self.servicer is not None:
            self.servicer.notify_published()
        return record

    def publish_cohort(
        self,
        cohort: str,
        base_version: str,
        target_version: str,
        payload: bytes,
        metadata: dict | None = None,
    ) -> UpdateRecord:
        """Publish an update for a cohort and wake watchers."""
        record = self.updates.publish_cohort(cohort, base_version, target_version, payload, metadata)
        if self.servicer is not None:
            self.servicer.notify_published()
        return record

    async def wait(self) -> None:
        """Block until the server terminates."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish in-flight ones within ``grace`` seconds, close the stores."""
        if self._server is not None:
            await self._server.stop(self.config.grace_s if grace is None else grace)
            self._server = None
        if self.writer is not None:
            await self.writer.close()
            self.writer = None
        self._unsubscribe()
        if self.servicer is not None:
            await self.servicer.close()
        if self._validator is not None:
            self._validator.shutdown(wait=True)
            self._validator = None
        self.metrics.close()
        self.samples.close()
        self.devices.close()
        self.updates.close()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(grace=0.5)
