"""Helpers shared by the transport tests: gateway + device client wiring on ephemeral ports."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from bench.transport_common import REPO_ROOT, gateway_process, sample_payload  # noqa: F401  (shared with the benchmarks)
from cloud.config import GatewayConfig
from cloud.gateway import GatewayServer
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig


def gateway_config(data_dir: Path, **overrides) -> GatewayConfig:
    """A gateway on 127.0.0.1:0 with small chunks so multi-chunk paths are exercised."""
    base = dict(
        host="127.0.0.1",
        port=0,
        data_dir=data_dir,
        chunk_size=64 * 1024,
        max_message_bytes=1024 * 1024,
        max_sample_bytes=4 * 1024 * 1024,
        watch_poll_interval_s=0.2,
        sqlite_synchronous="NORMAL",
        open_enrollment=True,
    )
    base.update(overrides)
    return GatewayConfig(**base)


def device_config(state_dir: Path, gateway: str, device_id: str = "dev-1", **overrides) -> DeviceClientConfig:
    """A device client with fast backoff for tests."""
    base = dict(
        gateway=gateway,
        state_dir=state_dir,
        device_id=device_id,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        backoff_jitter_s=0.05,
        rpc_timeout_s=20.0,
        poll_interval_s=0.05,
    )
    base.update(overrides)
    return DeviceClientConfig(**base)


@asynccontextmanager
async def running_gateway(data_dir: Path, **overrides):
    """An in-process gateway that stops by itself."""
    gw = GatewayServer(gateway_config(data_dir, **overrides))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(grace=0.2)


@asynccontextmanager
async def registered_client(state_dir: Path, gateway: str, device_id: str = "dev-1", **overrides):
    """A GatewayClient that has registered ``device_id`` and saved its identity."""
    cfg = device_config(state_dir, gateway, device_id, **overrides)
    client = GatewayClient(cfg)
    try:
        identity = await client.register()
        identity.save(state_dir)
        yield client
    finally:
        await client.close()
