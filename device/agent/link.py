"""The agent's link to the cloud: uplink, update fetcher and heartbeats, run side by side until stopped.

Heartbeats carry the version the device holds, its metrics and outbox depth, the link capacity, and, once after a
rollback, the version it left and why (so the cloud rebases its mirror on what the device really holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import clock as clocks
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.fetcher import ApplyCallback, UpdateFetcher
from device.transport.identity import DeviceIdentity
from device.transport.outbox import Outbox
from device.transport.retry import is_transient
from device.transport.uplink import UplinkWorker
from device.uts.basis import CloudAccepts

log = logging.getLogger("tandem.device.link")


@dataclass
class HeartbeatInfo:
    """What the next heartbeat says besides the version."""

    status: str = "ok"
    metrics: dict[str, float] | None = None
    rolled_back_from: str = ""
    rollback_reason: str = ""
    downlink_bytes_per_s: int = 0
    uplink_bytes_per_s: int = 0


StatusCallback = Callable[[], HeartbeatInfo]
SentCallback = Callable[[HeartbeatInfo], None]
"""Called after a heartbeat went through (e.g. to clear a reported rollback)."""


class LinkLoops:
    """Owns the outbox, one channel and the three loops; ``outbox.put`` from anywhere queues a sample."""

    def __init__(
        self,
        config: DeviceClientConfig,
        apply: ApplyCallback,
        status: StatusCallback | None = None,
        identity: DeviceIdentity | None = None,
        on_sent: SentCallback | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.identity = identity or DeviceIdentity.load(config.state_dir)
        self.outbox = outbox or Outbox(Path(config.state_dir) / "outbox.db", self.identity.max_sample_bytes or None)
        self.client = GatewayClient(config, self.identity)
        self.uplink = UplinkWorker(self.client, self.outbox, config)
        self.fetcher = UpdateFetcher(self.client, self.identity, config, apply)
        self.status = status or HeartbeatInfo
        self.on_sent = on_sent
        self.heartbeats = 0
        self.connected = False
        self.cloud_accepts = CloudAccepts(self.identity.sample_formats, self.identity.feature_bases)
        """What the cloud decodes, as Register said and every heartbeat since."""

    async def heartbeat_once(self) -> None:
        """Send one heartbeat now (raises on failure)."""
        info = self.status()
        extra: dict[str, str | int] = {
            "downlink_bytes_per_s": info.downlink_bytes_per_s,
            "uplink_bytes_per_s": info.uplink_bytes_per_s,
        }
        if info.rolled_back_from:
            extra.update(rolled_back_from=info.rolled_back_from, rollback_reason=info.rollback_reason[:512])
        depth = (await asyncio.to_thread(self.outbox.stats)).pending
        resp = await self.client.heartbeat(
            info.status, self.fetcher.current_version, info.metrics or {}, depth, **extra
        )
        self.cloud_accepts = CloudAccepts(tuple(resp.sample_formats), tuple(resp.feature_bases))
        self.heartbeats += 1
        self.connected = True
        if self.on_sent is not None:
            self.on_sent(info)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.heartbeat_once()
            except Exception as exc:  # a missed heartbeat is not fatal; the next one retries
                self.connected = False
                if not is_transient(exc):
                    raise
                log.info("heartbeat failed: %s", exc)
            await clocks.current().wait(stop, self.config.heartbeat_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Run uplink, fetcher and heartbeats until ``stop`` is set or one fails for good."""
        tasks = [
            asyncio.create_task(self.uplink.run(stop), name="uplink"),
            asyncio.create_task(self.fetcher.run(stop), name="fetcher"),
            asyncio.create_task(self._heartbeat_loop(stop), name="heartbeat"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            stop.set()
            for t in tasks:
                if not t.done():
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(t, timeout=5)

    async def close(self) -> None:
        """Close the channel and the outbox."""
        await self.client.close()
        self.outbox.close()
