"""The synthetic world as a device agent's input source: frames of a device's drifting stream, on its clock.

``WorldSource`` implements the agent's ``Source`` protocol. Each poll returns the frames that fell due since the
last one at the device's request rate, rendered in the domain its drift schedule gives at that moment. The
answers stay here (for scoring the live stream); a frame carries only its world index and capture time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from common import clock as clocks
from device.agent import Frame
from sim.fleet.scenario import DeviceSpec
from sim.world import World

MAX_FRAMES_PER_POLL = 16
"""A device that fell further behind drops the older frames (a camera does not queue forever)."""


class WorldSource:
    """One device's camera onto the synthetic world."""

    def __init__(
        self, spec: DeviceSpec, world: World, start: float | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self.spec = spec
        self.world = world
        self.name = "world"
        self._clock = clock or clocks.current().monotonic
        self._t0 = self._clock() if start is None else start
        """The run's time 0 on ``clock`` (every device of a run shares it, so drift steps line up)."""
        self.emitted = 0
        self.dropped = 0
        self.stopped = False
        self.polling = False
        """True while a poll renders frames (host work the simulator waits for)."""
        self._lock = threading.Lock()
        self.truth: dict[int, str] = {}
        """World index -> the right answer, for frames not yet scored."""
        self.captured_at: dict[int, float] = {}
        """World index -> capture time (seconds since the run started), for frames not yet scored."""

    def set_start(self, start: float) -> None:
        """Move time 0 (the run's start on ``clock``)."""
        self._t0 = start

    @property
    def epoch(self) -> float:
        """The run's time 0 on this source's clock."""
        return self._t0

    def stop(self) -> None:
        """The camera goes dark: later polls return nothing."""
        self.stopped = True

    def elapsed_s(self) -> float:
        """Seconds since this source started."""
        return self._clock() - self._t0

    def interval_s(self) -> float:
        """How often the agent should poll (the frame period, at most 1 s)."""
        return min(1.0, 1.0 / self.spec.request_rate_hz)

    def poll(self) -> list[Frame]:
        """Frames due now, in the domain of this moment."""
        self.polling = True
        try:
            return self._poll()
        finally:
            self.polling = False

    def _poll(self) -> list[Frame]:
        if self.stopped:
            return []
        t = self.elapsed_s()
        due = int(t * self.spec.request_rate_hz) + 1 - self.emitted - self.dropped
        if due <= 0:
            return []
        if due > MAX_FRAMES_PER_POLL:
            self.dropped += due - MAX_FRAMES_PER_POLL
            due = MAX_FRAMES_PER_POLL
        domain = self.spec.drift.domain_at(t)
        frames = []
        for _ in range(due):
            n = self.emitted + self.dropped
            index = self.spec.stream_offset + n
            sample = self.world.sample(index, domain)
            with self._lock:
                self.truth[index] = sample.answer
                self.captured_at[index] = t
            self.emitted += 1
            meta = {"sim_index": str(index), "sim_t": f"{t:.3f}", "sim_domain": domain}
            frames.append(Frame(sample.question, image=sample.image, metadata=meta))
        return frames

    def score(self, index: int, answer: str) -> tuple[bool, float] | None:
        """Whether ``answer`` to frame ``index`` is right, and the frame's capture time (None if unknown)."""
        with self._lock:
            truth = self.truth.pop(index, None)
            t = self.captured_at.pop(index, None)
        if truth is None or t is None:
            return None
        return answer == truth, t

    def close(self) -> None:
        with self._lock:
            self.truth.clear()
            self.captured_at.clear()
