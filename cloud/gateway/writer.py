"""Group commit: samples from concurrent uploads are written to the store in shared transactions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from cloud.gateway.metrics import GatewayMetrics
from cloud.samples.base import Committed, Sample, SampleStore


class GroupCommitWriter:
    """Serialises all store access on one thread and batches queued writes into one durable commit."""

    def __init__(self, store: SampleStore, metrics: GatewayMetrics, max_batch_bytes: int) -> None:
        self._store = store
        self._metrics = metrics
        self._max_batch_bytes = max_batch_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-writer")
        self._queue: asyncio.Queue[tuple[Sequence[Sample], asyncio.Future[Committed]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the commit loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def put(self, samples: Sequence[Sample]) -> Committed:
        """Store ``samples`` durably; returns, per sample, whether it was new, and the devices' high-waters."""
        if not samples:
            return Committed([], {})
        fut: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        await self._queue.put((samples, fut))
        return await fut

    async def high_water(self, device_id: str) -> int:
        """Highest stored seq of ``device_id``."""
        executor = None if self._store.concurrent_reads else self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, self._store.high_water, device_id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = sum(len(s.payload) for s in batch[0][0])
            while not self._queue.empty() and size < self._max_batch_bytes:
                item = self._queue.get_nowait()
                batch.append(item)
                size += sum(len(s.payload) for s in item[0])
            flat = [s for samples, _ in batch for s in samples]
            started = time.perf_counter()
            try:
                done = await loop.run_in_executor(self._executor, self._store.commit, flat)
            except Exception as exc:  # the store failed: every waiter sees the error, nothing is acked
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self._metrics.commit_seconds.observe(time.perf_counter() - started)
            self._metrics.commit_samples.observe(len(flat))
            self._metrics.upload_bytes.inc(sum(len(s.payload) for s in flat))
            pos = 0
            for samples, fut in batch:
                if not fut.done():
                    mine = {s.device_id for s in samples}
                    high = {d: q for d, q in done.high_water.items() if d in mine}
                    fut.set_result(Committed(done.new[pos : pos + len(samples)], high))
                pos += len(samples)

    async def close(self) -> None:
        """Stop the loop (after pending commits) and release the thread."""
        await stop_commit_loop(self._queue, self._task, self._executor, 30.0)


async def stop_commit_loop(
    queue: asyncio.Queue, task: asyncio.Task[None] | None, executor: ThreadPoolExecutor, drain_s: float
) -> None:
    """Let a group-commit loop drain ``queue`` (for up to ``drain_s``), cancel ``task``, release its thread."""
    deadline = asyncio.get_running_loop().time() + drain_s
    while not queue.empty() and task is not None and not task.done():
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.01)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    executor.shutdown(wait=True)
