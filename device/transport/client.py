"""Thin async client of ``tandem.v1.DeviceGateway``: channel setup (TLS, keepalive, limits) and calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import grpc

from common import clock as clocks
from common.codec import iter_chunks
from common.errors import ConfigError
from device.transport.config import DeviceClientConfig
from device.transport.identity import DeviceIdentity
from device.transport.outbox import OutboxItem
from protocol.auth import bearer_metadata
from protocol.limits import DEFAULT_CHUNK_SIZE
from protocol.payload import describe_payload
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc


def channel_options(config: DeviceClientConfig) -> list[tuple[str, int | str]]:
    """Message limits, keepalive and fast reconnects (retries are ours, with backoff)."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.backoff_max_s * 1000)),
        ("grpc.enable_retries", 0),
    ]
    if config.tls is not None and config.tls.server_name:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    return options


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"TLS file not found: {path}")
    return Path(path).read_bytes()


def make_channel(config: DeviceClientConfig, target: str | None = None) -> grpc.aio.Channel:
    """An aio channel to the gateway (TLS / mTLS when configured)."""
    target = target or config.gateway
    tls = config.tls
    compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
    if tls is None:
        return grpc.aio.insecure_channel(target, options=channel_options(config), compression=compression)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )
    return grpc.aio.secure_channel(target, creds, options=channel_options(config), compression=compression)


class GatewayClient:
    """One channel to the gateway; calls carry the device token once an identity is set."""

    def __init__(self, config: DeviceClientConfig, identity: DeviceIdentity | None = None) -> None:
        self.config = config
        self.identity = identity
        target = identity.gateway if identity is not None else config.gateway
        self.channel = make_channel(config, target)
        self.stub = gateway_pb2_grpc.DeviceGatewayStub(self.channel)

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.identity.token) if self.identity else ()

    @property
    def chunk_size(self) -> int:
        """Chunk size agreed at registration."""
        return self.identity.chunk_size if self.identity else DEFAULT_CHUNK_SIZE

    async def register(self, capabilities: gateway_pb2.Capabilities | None = None) -> DeviceIdentity:
        """Enrol (or re-enrol with the current token) and return the new identity; does not save it."""
        c = self.config
        if not c.device_id:
            raise ConfigError("device_id is required to register")
        resp = await self.stub.Register(
            gateway_pb2.RegisterRequest(
                device_id=c.device_id,
                model_family=c.model_family,
                model_version=c.model_version,
                capabilities=capabilities or gateway_pb2.Capabilities(),
                cohort=c.cohort,
                enrollment_secret=c.enrollment_secret or "",
            ),
            metadata=self._metadata,
            timeout=c.rpc_timeout_s,
        )
        self.identity = DeviceIdentity(
            device_id=resp.device_id,
            token=resp.device_token,
            cohort=resp.cohort,
            gateway=c.gateway,
            cloud_public_key_pem=resp.cloud_public_key_pem.decode(),
            chunk_size=resp.chunk_size,
            max_sample_bytes=resp.max_sample_bytes,
            sample_formats=tuple(resp.sample_formats),
            feature_bases=tuple(resp.feature_bases),
        )
        self.registered_acked_seq = resp.acked_seq
        return self.identity

    async def upload(self, items: Sequence[OutboxItem]) -> gateway_pb2.UploadResponse:
        """Stream ``items`` (ascending seq) in chunks; the answer acks the highest seq stored."""
        return await self.stub.Upload(
            _chunks(items, self.chunk_size), metadata=self._metadata, timeout=self.config.rpc_timeout_s
        )

    def fetch(self, update_id: int, offset: int) -> AsyncIterator[gateway_pb2.UpdateChunk]:
        """Chunks of one update from ``offset``."""
        return self.stub.FetchUpdate(
            gateway_pb2.FetchUpdateRequest(update_id=update_id, offset=offset),
            metadata=self._metadata,
            timeout=self.config.rpc_timeout_s,
        )

    def watch(self, current_version: str, after_update_id: int) -> AsyncIterator[gateway_pb2.UpdateNotice]:
        """Notices of updates for this device or its cohort (stream stays open)."""
        return self.stub.WatchUpdates(
            gateway_pb2.WatchUpdatesRequest(current_version=current_version, after_update_id=after_update_id),
            metadata=self._metadata,
        )

    async def heartbeat(
        self,
        status: str,
        applied_version: str,
        metrics: dict[str, float],
        outbox_depth: int,
        **extra: str | int,
    ) -> gateway_pb2.HeartbeatResponse:
        """Report liveness; ``extra`` sets further HeartbeatRequest fields (rolled_back_from, rollback_reason,
        downlink_bytes_per_s, uplink_bytes_per_s)."""
        return await self.stub.Heartbeat(
            gateway_pb2.HeartbeatRequest(
                status=status, applied_version=applied_version, metrics=metrics, outbox_depth=outbox_depth, **extra
            ),
            metadata=self._metadata,
            timeout=self.config.rpc_timeout_s,
        )

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _chunks(items: Iterable[OutboxItem], chunk_size: int):
    """Sync generator of SampleChunk messages (grpc consumes it lazily)."""
    for item in items:
        whole = len(item.payload) <= chunk_size  # one chunk: pass the bytes object on without a copy
        for offset, piece in iter_chunks(item.payload, chunk_size):
            if offset == 0:
                yield gateway_pb2.SampleChunk(
                    seq=item.seq,
                    offset=0,
                    data=item.payload if whole else bytes(piece),
                    payload=describe_payload(item.payload, item.sha256 or None),
                    metadata=item.metadata,
                    created_unix_ms=item.created_unix_ms,
                )
            else:
                yield gateway_pb2.SampleChunk(seq=item.seq, offset=offset, data=bytes(piece))


def now_ms() -> int:
    """The process's clock in milliseconds since the Unix epoch."""
    return clocks.current().now_ms()
