"""Uplink worker: streams unacked outbox samples in seq order and deletes them once the cloud acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.outbox import Outbox
from device.transport.retry import retrying

log = logging.getLogger("tandem.device.uplink")


@dataclass
class UplinkStats:
    """Counters since the worker started."""

    batches: int = 0
    acked: int = 0
    duplicates: int = 0
    attempts_failed: int = 0
    acked_seq: int = 0


class UplinkWorker:
    """Pushes the outbox through a GatewayClient with exponential backoff and jitter on link failures."""

    def __init__(self, client: GatewayClient, outbox: Outbox, config: DeviceClientConfig) -> None:
        self.client = client
        self.outbox = outbox
        self.config = config
        self.stats = UplinkStats()

    async def push_batch(self) -> int:
        """Upload one batch, retrying transient failures; returns how many samples were acked."""
        c = self.config
        async for attempt in retrying(c.backoff_initial_s, c.backoff_max_s, c.backoff_jitter_s):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.stats.attempts_failed += 1
                items = await asyncio.to_thread(self.outbox.pending, c.batch_max_samples, c.batch_max_bytes)
                if not items:
                    return 0
                resp = await self.client.upload(items)
        deleted = await asyncio.to_thread(self.outbox.ack, resp.acked_seq)
        self.stats.batches += 1
        self.stats.acked += deleted
        self.stats.duplicates += resp.duplicates
        self.stats.acked_seq = max(self.stats.acked_seq, resp.acked_seq)
        if deleted == 0 and items[0].seq > resp.acked_seq:
            raise RuntimeError(
                f"cloud acked seq {resp.acked_seq} below the oldest pending seq {items[0].seq}"
            )
        return deleted

    async def push_all(self) -> int:
        """Upload until the outbox is empty; returns the number of samples acked."""
        total = 0
        while True:
            n = await self.push_batch()
            if n == 0 and not await asyncio.to_thread(self.outbox.pending, 1, 1):
                return total
            total += n

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the outbox drained until ``stop`` is set."""
        while not stop.is_set():
            await self.push_all()
            if await asyncio.to_thread(self.outbox.pending, 1, 1):
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.poll_interval_s)
