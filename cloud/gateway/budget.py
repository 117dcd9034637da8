"""The gateway's memory budget: bytes of sample data all Upload streams may hold at once."""

from __future__ import annotations

import asyncio


class BudgetExhausted(Exception):
    """No room in the budget within the wait; the call answers RESOURCE_EXHAUSTED (the client retries)."""


class MemoryBudget:
    """A byte counter with a ceiling; ``acquire`` waits up to ``wait_s`` for room."""

    def __init__(self, limit_bytes: int, wait_s: float) -> None:
        self.limit = limit_bytes
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._changed = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        """Hold ``n`` more bytes; BudgetExhausted when they do not fit within ``wait_s``."""
        if n > self.limit:
            raise BudgetExhausted(f"{n} bytes exceed the gateway's whole buffer budget of {self.limit}")
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + n <= self.limit), self.wait_s)
            except asyncio.TimeoutError:
                raise BudgetExhausted(
                    f"gateway upload buffers full ({self.used} of {self.limit} bytes held for {self.wait_s:g} s); "
                    "retry later"
                ) from None
            self.used += n
            self.peak = max(self.peak, self.used)

    async def release(self, n: int) -> None:
        """Give back ``n`` bytes and wake waiters."""
        if n <= 0:
            return
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


class StreamHold:
    """What one Upload stream holds from the budget; ``close`` returns it all."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    async def take(self, n: int) -> None:
        """Hold ``n`` more bytes for this stream."""
        await self.budget.acquire(n)
        self.held += n

    async def give(self, n: int) -> None:
        """Return ``n`` of this stream's bytes."""
        n = min(n, self.held)
        self.held -= n
        await self.budget.release(n)

    async def close(self) -> None:
        """Return everything this stream still holds."""
        await self.give(self.held)
