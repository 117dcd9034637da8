"""An asyncio token bucket: ``await take(n)`` returns when n bytes may pass at the configured rate."""

from __future__ import annotations

import asyncio

from common import clock as clocks


class TokenBucket:
    """Rate limiter in bytes per second with a small burst (default 5 ms of traffic, at least one packet);
    a take larger than the bucket goes into debt, paid by sleeping, so any piece size keeps the rate."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float | None = None) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate_bytes_per_s
        self._auto_burst = burst_bytes is None
        self.burst = burst_bytes if burst_bytes is not None else max(1500.0, rate_bytes_per_s * 0.005)
        self._tokens = self.burst
        self._clock = clocks.current()
        self._stamp = self._clock.monotonic()
        self._lock = asyncio.Lock()

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change the rate from now on (a trace step); the burst follows unless it was given explicitly."""
        if rate_bytes_per_s <= 0:
            raise ValueError("rate must be positive")
        if self._auto_burst:
            self.burst = max(1500.0, rate_bytes_per_s * 0.005)
        self.rate = rate_bytes_per_s

    async def take(self, n: int) -> None:
        """Consume ``n`` tokens, sleeping while the bucket is in debt."""
        async with self._lock:
            now = self._clock.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await self._clock.sleep(-self._tokens / self.rate)
