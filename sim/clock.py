"""Virtual time for the fleet simulator: time passes only when the harness advances it.

The harness owns a :class:`VirtualClock` and installs it for its process (``common.clock.install``), so every
agent, link emulator and world source in the process sleeps on it; the cloud child process reads the same time
from the shared file the clock writes (``common.clock.SharedClock``). The harness advances time in small steps
and, before each step, waits until the host has finished the work that falls due in it (see
``sim/fleet/lockstep.py``): so what a report says is a function of the scenario, not of the host's speed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from pathlib import Path

from common.clock import Clock, SharedClockFile


class VirtualClock(Clock):
    """Seconds since the run started, advanced by :meth:`advance_to`; sleepers wake in time order."""

    virtual = True

    def __init__(self, shared_file: str | Path | None = None, epoch_unix: float | None = None) -> None:
        self._now = 0.0
        self.epoch_unix = time.time() if epoch_unix is None else epoch_unix
        self._heap: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self.shared = SharedClockFile(shared_file, create=True) if shared_file is not None else None
        if self.shared is not None:
            self.shared.set_now(0.0, self.epoch_unix)

    # -- reading -------------------------------------------------------------------------------------------
    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self.epoch_unix + self._now

    # -- waiting -------------------------------------------------------------------------------------------
    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            heapq.heappush(self._heap, (self._now + seconds, next(self._order), fut))
        await fut

    def sleep_blocking(self, seconds: float) -> None:
        due = self._now + max(0.0, seconds)
        with self._cond:
            self._cond.wait_for(lambda: self._now >= due)

    def next_due(self) -> float | None:
        """When the earliest sleeper wakes (None: nobody sleeps)."""
        with self._lock:
            while self._heap and self._heap[0][2].done():  # cancelled sleepers
                heapq.heappop(self._heap)
            return self._heap[0][0] if self._heap else None

    # -- advancing (the harness only, on the event loop's thread) ------------------------------------------
    def advance_to(self, t: float) -> int:
        """Move time to ``t`` (never back) and wake every sleeper due by then; returns how many woke."""
        woken = 0
        with self._lock:
            t = max(t, self._now)
            self._now = t
            due = []
            while self._heap and self._heap[0][0] <= t:
                due.append(heapq.heappop(self._heap)[2])
        with self._cond:
            self._cond.notify_all()
        for fut in due:
            if not fut.done():
                fut.set_result(None)
                woken += 1
        if self.shared is not None:
            self.shared.set_now(t)
        return woken

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
