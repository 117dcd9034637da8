"""Registering a device: one function for ``tandem-device register`` and for every simulated device."""

from __future__ import annotations

from pathlib import Path

from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.identity import DeviceIdentity
from device.transport.outbox import Outbox
from device.transport.retry import retrying


async def register_device(
    config: DeviceClientConfig, previous: DeviceIdentity | None = None, give_up_after_s: float | None = 0.0
) -> DeviceIdentity:
    """Register (rotating ``previous``'s token if given), save the identity in the state directory and move the
    outbox's seqs above what the cloud already holds. ``give_up_after_s`` > 0 retries transient failures (a slow
    link's connect timing out) with the transport's backoff for that long; 0 tries once."""
    async with GatewayClient(config, previous) as client:
        if give_up_after_s:
            c = config
            async for attempt in retrying(c.backoff_initial_s, c.backoff_max_s, c.backoff_jitter_s, give_up_after_s):
                with attempt:
                    identity = await client.register()
        else:
            identity = await client.register()
        acked = client.registered_acked_seq
    identity.save(config.state_dir)
    box = Outbox(Path(config.state_dir) / "outbox.db")
    try:
        box.ensure_seq_above(acked)
    finally:
        box.close()
    return identity
