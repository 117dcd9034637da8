"""Heartbeats in group commits: the heartbeats that arrive while one batch commits go in the next, one transaction
(one fsync on SQLite) for all of them, on one thread off the event loop. A call returns once its heartbeat is
committed, as before; a fleet's heartbeats just stop costing one write transaction each."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from cloud.devices import Devices, Heartbeat
from cloud.gateway.writer import stop_commit_loop

MAX_BATCH = 512


class HeartbeatWriter:
    """Queues heartbeats and commits whatever is queued in one ``Devices.record_heartbeats`` call."""

    def __init__(self, devices: Devices) -> None:
        self._devices = devices
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat-writer")
        self._queue: asyncio.Queue[tuple[Heartbeat, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the commit loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat-commit")

    async def record(self, beat: Heartbeat) -> None:
        """Record ``beat``; returns once it is committed (raises the store's error if the commit failed)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((beat, fut))
        await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await loop.run_in_executor(self._executor, self._devices.record_heartbeats, [b for b, _ in batch])
            except Exception as exc:  # every waiter sees the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def close(self) -> None:
        """Commit what is queued (within 10 s), stop the loop and release the thread."""
        await stop_commit_loop(self._queue, self._task, self._executor, 10.0)
