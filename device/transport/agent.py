"""Everything the device runs against the cloud, together: uplink, update fetcher and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.fetcher import ApplyCallback, UpdateFetcher
from device.transport.identity import DeviceIdentity
from device.transport.outbox import Outbox
from device.transport.retry import is_transient
from device.transport.uplink import UplinkWorker

log = logging.getLogger("tandem.device.agent")

StatusCallback = Callable[[], tuple[str, dict[str, float]]]
"""Returns ``(status text, metrics)`` for the next heartbeat."""


class TransportAgent:
    """Owns the outbox, one channel and the three loops; ``outbox.put`` from anywhere queues a sample."""

    def __init__(
        self,
        config: DeviceClientConfig,
        apply: ApplyCallback,
        status: StatusCallback | None = None,
        identity: DeviceIdentity | None = None,
    ) -> None:
        self.config = config
        self.identity = identity or DeviceIdentity.load(config.state_dir)
        self.outbox = Outbox(Path(config.state_dir) / "outbox.db", self.identity.max_sample_bytes or None)
        self.client = GatewayClient(config, self.identity)
        self.uplink = UplinkWorker(self.client, self.outbox, config)
        self.fetcher = UpdateFetcher(self.client, self.identity, config, apply)
        self.status = status or (lambda: ("ok", {}))
        self.heartbeats = 0

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            text, metrics = self.status()
            try:
                await self.client.heartbeat(text, self.fetcher.current_version, metrics, self.outbox.stats().pending)
                self.heartbeats += 1
            except Exception as exc:  # a missed heartbeat is not fatal; the next one retries
                if not is_transient(exc):
                    raise
                log.info("heartbeat failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.heartbeat_interval_s)

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
