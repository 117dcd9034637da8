"""Uplink worker: streams unacked outbox samples in seq order and deletes them once the cloud acks."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from common import clock as clocks
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.outbox import Outbox, OutboxItem
from device.transport.retry import DEVICE_LEVEL_CODES, retrying
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
    """Samples quarantined (refused by the cloud for good)."""


def _rejected_seq(exc: grpc.aio.AioRpcError) -> int | None:
    """The seq the gateway named as refused for its content (``tandem-rejected-seq`` trailer), if any."""
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
        self.on_acked: Callable[[int], None] | None = None
        """Called with the new highest acked seq after each successful Upload."""
        self._isolate_through = 0  # seqs up to this one are sent one per call (a batch was refused as a whole)

    async def _upload(self, items: list[OutboxItem]) -> gateway_pb2.UploadResponse | None:
        """Upload ``items``, retrying link failures with exponential backoff and jitter.

        Returns None when the cloud refused the call for good (a permanent status, or a server error that
        persisted): the refused sample is quarantined when the call names it (trailer) or holds only it;
        otherwise the batch is marked for one-by-one resending to find it. UNAUTHENTICATED is raised.
        """
        c = self.config
        try:
            async for attempt in retrying(
                c.backoff_initial_s,
                c.backoff_max_s,
                c.backoff_jitter_s,
                max_server_error_attempts=c.max_server_error_attempts,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.stats.attempts_failed += 1
                    return await self.client.upload(items)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in DEVICE_LEVEL_CODES:
                raise
            await self._set_aside(items, exc)
            return None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _set_aside(self, items: list[OutboxItem], exc: grpc.aio.AioRpcError) -> None:
        reason = f"{exc.code().name}: {exc.details() or 'refused'}"
        seq = _rejected_seq(exc)
        if seq is None and len(items) == 1:
            seq = items[0].seq
        if seq is None or seq not in {it.seq for it in items}:
            self._isolate_through = max(self._isolate_through, items[-1].seq)
            log.warning(
                "cloud refused a batch (%s); resending seq %d..%d one by one", reason, items[0].seq, items[-1].seq
            )
            return
        await asyncio.to_thread(self.outbox.quarantine, seq, reason)
        self.stats.rejected += 1
        log.warning("cloud refused sample %d, quarantined: %s", seq, reason)

    async def _read(self, after_seq: int) -> list[OutboxItem]:
        c = self.config
        one_by_one = after_seq < self._isolate_through
        limit = 1 if one_by_one else c.batch_max_samples
        return await asyncio.to_thread(self.outbox.pending, limit, c.batch_max_bytes, after_seq)

    async def push_all(self) -> int:
        """Upload until the outbox is empty; returns the number of samples acked.

        Up to ``max_in_flight_batches`` Upload calls run at once (the next batch streams while the previous
        one commits). A call that returns OK means every sample in it is durable, so exactly those samples
        are deleted; a failed call leaves its samples queued and they are sent again. A sample the cloud
        refuses for good is quarantined and the queue moves on.
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
                    if last_read <= self._isolate_through:
                        break  # one sample at a time while looking for a refused one
                if not inflight:
                    return total
                items, upload = inflight.popleft()
                resp = await upload
                if resp is None:  # something was set aside: finish the others, then start over from the top
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
        if resp.acked_seq > self.stats.acked_seq:
            self.stats.acked_seq = resp.acked_seq
            if self.on_acked is not None:
                self.on_acked(resp.acked_seq)
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the outbox drained until ``stop`` is set."""
        while not stop.is_set():
            await self.push_all()
            await clocks.current().wait(stop, self.config.poll_interval_s)
