"""One clock for the roles: every time-based behaviour reads the clock installed for its process.

Deployment keeps the default, :data:`WALL` (``time.monotonic`` / ``time.time`` / ``asyncio.sleep``), and behaves
exactly as if nothing read a clock. The fleet simulator installs virtual time (``sim/clock.py``) in its own
process, and the cloud service it starts reads the same virtual time from a small shared file
(:class:`SharedClock`, which ``tandem-cloud serve`` installs when its config names ``sim_clock``).

Only *behaviour* reads this clock (batch windows, budget periods, heartbeats, retry backoff, scheduler triggers,
stamps a report reads). gRPC deadlines and other safety nets stay on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import mmap
import struct
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path


class Clock(ABC):
    """Seconds that only go forward (``monotonic``), the date (``time``) and ways to wait on them."""

    virtual = False
    """True when time passes only as the simulator advances it."""

    @abstractmethod
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (differences only)."""

    @abstractmethod
    def time(self) -> float:
        """Seconds since the Unix epoch."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch (the stamps the stores keep)."""
        return int(self.time() * 1000)

    @abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass on this clock."""

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set or ``timeout`` seconds passed on this clock; True if the event is set."""
        if event.is_set():
            return True
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, sleeper):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        return event.is_set()

    @abstractmethod
    def sleep_blocking(self, seconds: float) -> None:
        """Block the calling (non-event-loop) thread until ``seconds`` passed on this clock."""


class WallClock(Clock):
    """The machine's clocks: what deployment runs on."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
        return event.is_set()

    def sleep_blocking(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


WALL = WallClock()
_current: Clock = WALL


def current() -> Clock:
    """The clock installed for this process (:data:`WALL` unless a simulator installed another)."""
    return _current


def install(clock: Clock) -> Clock:
    """Make ``clock`` this process's clock; returns the one it replaces."""
    global _current
    previous, _current = _current, clock
    return previous


# -- virtual time shared between the simulator and the cloud process it starts --------------------------------
_LAYOUT = struct.Struct("<dqqdqd")
"""now (virtual s), tick, ack tick, barrier (virtual s), gateway calls in flight, Unix time of virtual 0."""
_NOW, _TICK, _ACK, _BARRIER, _CALLS, _EPOCH = range(6)
POLL_S = 0.002
"""How often a reader of the shared clock looks at it while waiting."""


class SharedClockFile:
    """The memory-mapped file both processes open: the simulator writes time and ticks, the cloud writes acks."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(_LAYOUT.pack(0.0, 0, 0, math.inf, 0, time.time()))
        with self.path.open("r+b") as f:
            self._map = mmap.mmap(f.fileno(), _LAYOUT.size)
        self._lock = threading.Lock()

    def read(self) -> tuple:
        return _LAYOUT.unpack(self._map[: _LAYOUT.size])

    def _write(self, index: int, value: float | int) -> None:
        """Write one field's own 8 bytes: each field has one writer (the simulator: now, tick, epoch; the cloud:
        ack, barrier, calls), so neither process ever rewrites a field the other one owns."""
        kind = _LAYOUT.format[1 + index]
        struct.pack_into("<" + kind, self._map, 8 * index, value)

    def now(self) -> float:
        return self.read()[_NOW]

    def epoch_unix(self) -> float:
        return self.read()[_EPOCH]

    def tick(self) -> int:
        return self.read()[_TICK]

    def set_now(self, now: float, epoch_unix: float | None = None) -> None:
        if epoch_unix is not None:
            self._write(_EPOCH, epoch_unix)
        self._write(_NOW, now)

    def request_tick(self) -> int:
        """Ask the cloud for one loop turn at the current time; returns the tick to wait for."""
        with self._lock:
            tick = self.tick() + 1
            self._write(_TICK, tick)
            return tick

    def ack(self, tick: int, barrier: float) -> None:
        """The cloud has run its scheduler at ``tick``; nothing it holds is due before ``barrier``."""
        with self._lock:
            self._write(_BARRIER, barrier)  # before the ack: a reader that sees the tick sees its barrier
            self._write(_ACK, tick)

    def acked(self) -> tuple[int, float]:
        f = self.read()
        return f[_ACK], f[_BARRIER]

    def set_calls(self, calls: int) -> None:
        self._write(_CALLS, calls)

    def calls(self) -> int:
        return self.read()[_CALLS]

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


class SharedClock(Clock):
    """Virtual time read from a :class:`SharedClockFile` (the cloud's view of the simulator's clock)."""

    virtual = True

    def __init__(self, path: str | Path) -> None:
        self.file = SharedClockFile(path)

    def monotonic(self) -> float:
        return self.file.now()

    def time(self) -> float:
        return self.file.epoch_unix() + self.file.now()

    async def sleep(self, seconds: float) -> None:
        due = self.monotonic() + max(0.0, seconds)
        while self.monotonic() < due:
            await asyncio.sleep(POLL_S)

    def sleep_blocking(self, seconds: float) -> None:
        due = self.monotonic() + max(0.0, seconds)
        while self.monotonic() < due:
            time.sleep(POLL_S)
