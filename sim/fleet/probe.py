"""What the harness observes of one running agent, through the agent's public event hook
(``device.agent.events``): the answers it gives (scored against the world), the samples UTS queues, the seq the
cloud acked, the updates it applied and its rollbacks. Times are seconds since the run started, on the run's
clock (virtual time unless ``--realtime``)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from device.agent.events import AgentListener
from sim.fleet.results import Rollback
from sim.fleet.world_source import WorldSource


@dataclass
class Queued:
    """A sample the device's UTS chose: when its frame was captured and queued, and its size."""

    captured_s: float
    queued_s: float
    nbytes: int
    acked_s: float | None = None


@dataclass
class Applied:
    """A version the device started serving."""

    t_s: float
    version: str
    update_id: int | None = None


@dataclass
class ProbeData:
    """Everything recorded for one device."""

    queued: dict[int, Queued] = field(default_factory=dict)
    applied: list[Applied] = field(default_factory=list)
    rollbacks: list[Rollback] = field(default_factory=list)
    ask_ms: list[float] = field(default_factory=list)
    upload_ack_ms: list[float] = field(default_factory=list)
    hits: int = 0
    answered: int = 0


class DeviceProbe(AgentListener):
    """Subscribe to an agent before it starts (``agent.subscribe(probe)``)."""

    def __init__(self, source: WorldSource) -> None:
        self.source = source
        self.data = ProbeData()
        self._lock = threading.Lock()
        self._acked_seq = 0
        self._window = [0, 0]
        self._unacked: deque[int] = deque()

    def sample_queued(self, seq: int, nbytes: int, metadata: dict[str, str]) -> None:
        captured = float(metadata.get("sim_t", "nan"))
        with self._lock:
            self.data.queued[seq] = Queued(captured, self.source.elapsed_s(), nbytes)
            self._unacked.append(seq)

    def answered(self, requests, answers) -> None:
        for r, a in zip(requests, answers):
            index = r.frame.metadata.get("sim_index")
            if index is None:
                continue
            scored = self.source.score(int(index), a.answer)
            with self._lock:
                self.data.ask_ms.append(1000.0 * a.latency_s)
                if scored is not None:
                    self.data.answered += 1
                    self.data.hits += int(scored[0])
                    self._window[0] += int(scored[0])
                    self._window[1] += 1

    def uploaded(self, acked_seq: int) -> None:
        t = self.source.elapsed_s()
        with self._lock:
            while self._unacked and self._unacked[0] <= acked_seq:
                q = self.data.queued[self._unacked.popleft()]
                q.acked_s = t
                self.data.upload_ack_ms.append(1000.0 * (t - q.queued_s))
            self._acked_seq = max(self._acked_seq, acked_seq)

    def applied(self, version: str, update_id: int) -> None:
        with self._lock:
            self.data.applied.append(Applied(self.source.elapsed_s(), version, update_id))

    def rolled_back(self, from_version: str, to_version: str, reason: str) -> None:
        with self._lock:
            self.data.rollbacks.append(Rollback(
                    t_s=self.source.elapsed_s(), from_version=from_version, to_version=to_version, reason=reason
                ))

    def take_window(self) -> float | None:
        """Share of frames answered right since the last call (None when none were answered)."""
        with self._lock:
            hits, n = self._window
            self._window = [0, 0]
        return hits / n if n else None

    @property
    def acked_seq(self) -> int:
        return self._acked_seq
