"""One Upload stream: read chunks within the memory budget, verify each sample, commit them in groups."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from concurrent.futures import Executor

from cloud.gateway.assembler import SampleAssembler, verify
from cloud.gateway.budget import MemoryBudget, StreamHold
from cloud.gateway.writer import GroupCommitWriter
from cloud.samples.base import Sample

_FLUSH_SAMPLES = 64
_FLUSH_BYTES = 4 * 1024 * 1024
_THREAD_VERIFY_BYTES = 256 * 1024


class StreamIdle(Exception):
    """The client sent nothing for longer than the idle timeout."""


class UploadSession:
    """Holds at most ``stream_cap`` bytes of the shared budget; commits overlap with receiving the rest.

    On the first chunk of a sample the stream takes the sample's whole declared size from the budget before
    it reads more (waiting for its own commits first when it is at its cap). So sample data held beyond one
    first chunk per stream never exceeds the budget, and an admitted sample can always complete: partial
    samples cannot starve each other. The gateway caps concurrent Upload streams, which bounds the rest.
    """

    def __init__(
        self,
        device_id: str,
        *,
        chunk_size: int,
        max_sample_bytes: int,
        stream_cap: int,
        idle_timeout_s: float,
        budget: MemoryBudget,
        writer: GroupCommitWriter,
        validator: Executor,
    ) -> None:
        self.assembler = SampleAssembler(device_id, chunk_size, max_sample_bytes)
        self.stream_cap = stream_cap
        self.idle_timeout_s = idle_timeout_s
        self.hold = StreamHold(budget)
        self.writer = writer
        self.validator = validator
        self.pending: list[Sample] = []
        self.pending_bytes = 0
        self.writes: list[asyncio.Task[list[bool]]] = []
        self.device_id = device_id
        self.high_water: int | None = None
        """The device's high-water as of this stream's latest commit (None before any)."""

    async def receive(self, requests: AsyncIterable) -> None:
        """Consume the whole stream; raises ProtocolViolation, BudgetExhausted or StreamIdle.

        Samples completed before the exception are queued for commit (see ``flush`` and ``settle``).
        """
        it = requests.__aiter__()
        while True:
            starting = not self.assembler.in_sample
            try:
                chunk = await asyncio.wait_for(it.__anext__(), self.idle_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise StreamIdle(f"no message for {self.idle_timeout_s:g} s; stream ended") from None
            done = self.assembler.add(chunk)
            if starting and (done is not None or self.assembler.in_sample):  # admit the whole sample at once
                await self._make_room(len(done[0].payload) if done is not None else self.assembler.expected_size)
            if done is not None:
                await self._accept(*done)
        self.assembler.finish()

    async def _accept(self, sample: Sample, info) -> None:
        if len(sample.payload) >= _THREAD_VERIFY_BYTES:  # hash and parse off the event loop
            await asyncio.get_running_loop().run_in_executor(self.validator, verify, sample, info)
        else:
            verify(sample, info)
        self.pending.append(sample)
        self.pending_bytes += len(sample.payload)
        if len(self.pending) >= _FLUSH_SAMPLES or self.pending_bytes >= _FLUSH_BYTES:
            self.flush()

    async def _make_room(self, n: int) -> None:
        if self.hold.held + n > self.stream_cap:
            self.flush()
            if self.writes:
                await asyncio.wait(self.writes)
        await self.hold.take(n)

    def flush(self) -> None:
        """Queue the verified samples not yet handed to the writer."""
        if self.pending:
            self.writes.append(asyncio.ensure_future(self._commit(self.pending)))
            self.pending, self.pending_bytes = [], 0

    async def _commit(self, samples: list[Sample]) -> list[bool]:
        try:
            done = await self.writer.put(samples)
            self.high_water = max(self.high_water or 0, done.high_water.get(self.device_id, 0))
            return done.new
        finally:
            await self.hold.give(sum(len(s.payload) for s in samples))

    async def settle(self) -> tuple[int, int]:
        """Commit everything queued; returns (new, duplicate) counts. Raises the store's error if it failed."""
        self.flush()
        results = [r for batch in await asyncio.gather(*self.writes) for r in batch]
        self.writes = []
        new = sum(results)
        return new, len(results) - new

    async def close(self) -> None:
        """Wait for commits still running (their bytes are in memory until then), drop the data, return the budget.

        The session may outlive the call in a traceback (an abort's exception refers to the handler's frame), so
        it lets go of every buffer here rather than when it is collected.
        """
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
        self.writes, self.pending = [], []
        self.assembler.discard()
        await self.hold.close()
