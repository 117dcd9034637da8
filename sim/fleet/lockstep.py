"""Conservative time steps: the harness advances virtual time only once the host has done the work due so far.

One step: wake every sleeper due by the next moment (frames, link pieces, heartbeats, budget periods), wait
until the host has carried the work they caused (agents answered and queued, link emulators quiet, the gateway
answered every call that reached it), let the cloud run its scheduler at that moment and acknowledge it, wait
again for what the cloud's step caused (an update's notice travelling down), and move on. A job's update falls due
at its modelled time: the cloud's barrier holds virtual time there until the job has finished on this host.

Safety nets: if the host does not settle within ``settle_limit_s`` of wall time (a wedged call), the step goes on
and the report counts it (``safety_timeouts``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from common.errors import TandemError
from sim.clock import VirtualClock

log = logging.getLogger("tandem.sim.lockstep")

POLL_S = 0.002
QUIET_S = 0.006
"""Wall seconds a link emulator must have moved no bytes to count as quiet."""


@dataclass
class LockstepStats:
    steps: int = 0
    settle_wall_s: float = 0.0
    barrier_wall_s: float = 0.0
    """Wall seconds virtual time stood at a job's modelled end while the host finished the job."""
    cloud_wall_s: float = 0.0
    safety_timeouts: int = 0
    held: dict[str, int] = field(default_factory=dict)
    """How often each part kept a step waiting (polls of POLL_S)."""


class Lockstep:
    """Drives a :class:`VirtualClock` for the agents, links and the cloud process of one run."""

    def __init__(
        self,
        clock: VirtualClock,
        busy: Callable[[], bool],
        links: Callable[[], Iterable],
        max_step_s: float = 0.1,
        min_step_s: float = 0.02,
        settle_limit_s: float = 300.0,
        cloud_start_limit_s: float = 600.0,
    ) -> None:
        if clock.shared is None:
            raise TandemError("lockstep needs a clock with a shared file (the cloud reads it)")
        self.clock = clock
        self.busy = busy
        self.links = links
        self.max_step_s = max_step_s
        self.min_step_s = min_step_s
        self.settle_limit_s = settle_limit_s
        self.cloud_start_limit_s = cloud_start_limit_s
        self.stats = LockstepStats()
        self._cloud_seen = False
        self._barrier = math.inf

    # -- waiting for the host --------------------------------------------------------------------------------
    def _held_by(self) -> str | None:
        """What the host is still working on (None: nothing)."""
        if self.busy():
            return "agents"
        if self.clock.shared is not None and self.clock.shared.calls() > 0:
            return "gateway"
        now = time.perf_counter()
        if any(now - link.last_activity < QUIET_S for link in self.links()):
            return "links"
        return None

    async def settle(self) -> None:
        """Return once no agent is busy, no link moved bytes for a moment and the gateway holds no call."""
        start = time.perf_counter()
        calm = 0
        while calm < 2:
            await asyncio.sleep(POLL_S)
            held = self._held_by()
            if held is not None:
                self.stats.held[held] = self.stats.held.get(held, 0) + 1
                calm = 0
                if time.perf_counter() - start > self.settle_limit_s:
                    self.stats.safety_timeouts += 1
                    limit, now = self.settle_limit_s, self.now
                    log.warning("host did not settle in %.0f s at t=%.2f (%s busy); going on", limit, now, held)
                    break
            else:
                calm += 1
        self.stats.settle_wall_s += time.perf_counter() - start

    async def cloud_step(self) -> float:
        """Let the cloud run one loop turn at the current time and wait for it; returns its barrier."""
        shared = self.clock.shared
        assert shared is not None
        tick = shared.request_tick()
        start = time.perf_counter()
        limit = self.settle_limit_s if self._cloud_seen else self.cloud_start_limit_s
        while True:
            acked, barrier = shared.acked()
            if acked >= tick:
                self._cloud_seen = True
                self.stats.cloud_wall_s += time.perf_counter() - start
                return barrier
            if time.perf_counter() - start > limit:
                self.stats.safety_timeouts += 1
                log.warning("the cloud did not acknowledge t=%.2f in %.0f s; going on", self.now, limit)
                return math.inf
            await asyncio.sleep(POLL_S)

    # -- advancing -----------------------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.clock.monotonic()

    async def step(self, limit: float) -> None:
        """One step towards ``limit`` (never past it, nor past a job's due time the host has not reached)."""
        barrier = self._barrier
        while barrier <= self.now:  # a job is due now and still running here: the host catches up
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            barrier = await self.cloud_step()
            self.stats.barrier_wall_s += time.perf_counter() - start
            await self.settle()
        nxt = self.clock.next_due()
        target = self.now + self.max_step_s
        if nxt is not None:
            target = min(target, max(nxt, self.now + self.min_step_s))
        target = min(target, limit, barrier)
        self.clock.advance_to(target)
        self.stats.steps += 1
        await self.settle()
        self._barrier = await self.cloud_step()
        await self.settle()

    async def run_until(self, t: float) -> None:
        """Advance virtual time to ``t``."""
        while self.now < t:
            await self.step(t)

    async def run_for(self, seconds: float) -> None:
        await self.run_until(self.now + seconds)

    async def run_while(self, pending: asyncio.Future) -> None:
        """Keep time moving while ``pending`` (e.g. the set-up: registrations over slow links) runs."""
        while not pending.done():
            await self.step(self.now + self.max_step_s)
