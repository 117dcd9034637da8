"""What the harness observes of one running agent, through the agent's public objects: the samples its step
queues (the step's sink), the answers of each batch (the batcher's observer), the version it serves, its
rollbacks, the seq its uplink had acked, and the updates its fetcher applied."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from device.agent import DeviceAgent
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


class DeviceProbe:
    """Attach to an agent before it starts; ``tick(t)`` from the harness's loop records changes."""

    def __init__(self, agent: DeviceAgent, source: WorldSource) -> None:
        self.agent = agent
        self.source = source
        self.data = ProbeData()
        self._lock = threading.Lock()
        self._version = agent.step.version
        self._rollbacks = 0
        self._acked_seq = 0
        self._window = [0, 0]
        self._unacked: deque[int] = deque()
        agent.writer.on_written = self._record_sample
        self._observer = agent.batcher.on_batch
        agent.batcher.on_batch = self._record_batch

    def _record_sample(self, seq: int, payload: bytes, metadata: dict[str, str]) -> None:
        """The agent's outbox writer queued a sample durably (on its thread)."""
        captured = float(metadata.get("sim_t", "nan"))
        with self._lock:
            self.data.queued[seq] = Queued(captured, self.source.elapsed_s(), len(payload))
            self._unacked.append(seq)

    def _record_batch(self, requests, answers, forward_s: float) -> None:
        if self._observer is not None:
            self._observer(requests, answers, forward_s)
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

    def take_window(self) -> float | None:
        """Share of frames answered right since the last call (None when none were answered)."""
        with self._lock:
            hits, n = self._window
            self._window = [0, 0]
        return hits / n if n else None

    def tick(self, t_s: float) -> None:
        """Record a new version, a rollback, and samples newly acked."""
        agent = self.agent
        version = agent.step.version
        if agent.counts.get("rollbacks", 0) > self._rollbacks:
            self._rollbacks = agent.counts["rollbacks"]
            reason = agent.last_rollback.partition(": ")[2]
            self.data.rollbacks.append(Rollback(t_s=t_s, from_version=self._version, to_version=version, reason=reason))
        elif version != self._version:
            self.data.applied.append(Applied(t_s, version, self._update_id(version)))
        self._version = version
        link = agent.link
        acked = link.uplink.stats.acked_seq if link is not None else 0
        if acked > self._acked_seq:
            with self._lock:
                while self._unacked and self._unacked[0] <= acked:
                    q = self.data.queued[self._unacked.popleft()]
                    q.acked_s = t_s
                    self.data.upload_ack_ms.append(1000.0 * (t_s - q.queued_s))
            self._acked_seq = acked

    def _update_id(self, version: str) -> int | None:
        link = self.agent.link
        if link is None:
            return None
        for outcome in reversed(link.fetcher.outcomes):
            if outcome.applied and outcome.version == version:
                return outcome.update_id
        return None

    @property
    def acked_seq(self) -> int:
        return self._acked_seq
