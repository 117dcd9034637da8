"""Uplink worker: streams unacked outbox samples in seq order and deletes them once the cloud acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

import grpc

from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.outbox import Outbox, OutboxItem
from device.transport.retry import retrying
from protocol.limits import REJECTED_SEQ_TRAILER
from protocol.tandem.v1 import gateway_pb2

log = logging.getLogger("tandem.device.uplink")


@dataclass
class UplinkStats:
    """Counters since the worker started."""

    batches: int = 0
    acked: int = 0
    duplicates: int = 0
    attempts_failed: int = 0
    acked_seq: int = 0
    rejected: int = 0


def _rejected_seq(exc: grpc.aio.AioRpcError) -> int | None:
    """The seq the gateway named as refused for its content (INVALID_ARGUMENT + trailer), if any."""
    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == REJECTED_SEQ_TRAILER:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class UplinkWorker:
    """Pushes the outbox through a GatewayClient with exponential backoff and jitter on link failures."""

    def __init__(self, client: GatewayClient, outbox: Outbox, config: DeviceClientConfig) -> None:
        self.client = client
        self.outbox = outbox
        self.config = config
        self.stats = UplinkStats()

    async def _upload(self, items: list[OutboxItem]) -> gateway_pb2.UploadResponse | None:
        """Upload ``items``, retrying transient failures with exponential backoff and jitter.

        Returns None when the cloud refused one of the samples for its content: that sample is moved to the
        outbox's ``rejected`` table and the caller carries on with the rest.
        """
        c = self.config
        try:
            async for attempt in retrying(c.backoff_initial_s, c.backoff_max_s, c.backoff_jitter_s):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.stats.attempts_failed += 1
                    return await self.client.upload(items)
        except grpc.aio.AioRpcError as exc:
            seq = _rejected_seq(exc)
            if seq is None or seq not in {it.seq for it in items}:
                raise
            await asyncio.to_thread(self.outbox.quarantine, seq, exc.details() or "rejected")
            self.stats.rejected += 1
            log.warning("cloud refused sample %d, set aside: %s", seq, exc.details())
            return None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, after_seq: int) -> list[OutboxItem]:
        c = self.config
        return await asyncio.to_thread(self.outbox.pending, c.batch_max_samples, c.batch_max_bytes, after_seq)

    async def push_all(self) -> int:
        """Upload until the outbox is empty; returns the number of samples acked.

        Up to ``max_in_flight_batches`` Upload calls run at once (the next batch streams while the previous
        one commits). A call that returns OK means every sample in it is durable, so exactly those samples
        are deleted; a failed call leaves its samples queued and they are sent again.
        """
        limit = self.config.max_in_flight_batches
        total = 0
        inflight: deque[tuple[list[OutboxItem], asyncio.Future]] = deque()
        last_read = 0
        try:
            while True:
                while len(inflight) < limit:
                    items = await self._read(last_read)
                    if not items:
                        break
                    last_read = items[-1].seq
                    inflight.append((items, asyncio.ensure_future(self._upload(items))))
                if not inflight:
                    return total
                items, upload = inflight.popleft()
                resp = await upload
                if resp is None:  # a sample was set aside: finish the others, then start over from the top
                    for later_items, later in inflight:
                        later_resp = await later
                        if later_resp is not None:
                            total += await self._delete(later_items, later_resp)
                    inflight.clear()
                    last_read = 0
                    continue
                total += await self._delete(items, resp)
        finally:
            for _, upload in inflight:
                upload.cancel()

    async def _delete(self, items: list[OutboxItem], resp: gateway_pb2.UploadResponse) -> int:
        """Delete the samples of a successful Upload call and count them."""
        if resp.acked_seq < items[-1].seq:
            raise RuntimeError(f"cloud acked seq {resp.acked_seq} below the last sent seq {items[-1].seq}")
        deleted = await asyncio.to_thread(self.outbox.delete, [it.seq for it in items])
        self.stats.batches += 1
        self.stats.acked += deleted
        self.stats.duplicates += resp.duplicates
        self.stats.acked_seq = max(self.stats.acked_seq, resp.acked_seq)
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the outbox drained until ``stop`` is set."""
        while not stop.is_set():
            await self.push_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.poll_interval_s)
