"""One micro-batcher for many agents in one process: each batch is one forward over every tenant's rows, each
row with its own agent's adapter (``device.agent.tenants``).

An agent gets a ``Lane``, which has the ``MicroBatcher`` surface the agent uses (submit, between_batches, start,
stop, depth, host_busy). Each lane models its own device: with a compute model, a lane's answers go out when its
modelled device would have finished them (its previous batch first), not when the host's shared forward did, so
one agent's latency never includes another agent's compute. The fleet simulator serves every simulated agent
this way: N devices cost a few batched forwards per virtual second instead of N forwards.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from common import clock as clocks
from device.agent.batcher import BatchCallback, BatcherBusy, BatcherStopped, ComputeModel, MicroBatcher, Request
from device.agent.step import Answer, DeviceStep, Frame
from device.agent.tenants import TenantModel, TenantModels

log = logging.getLogger("tandem.device.shared_batcher")


@dataclass
class LaneRequest(Request):
    lane: Lane | None = None


@dataclass(order=True)
class _Release:
    due: float
    order: int
    lane: Lane = field(compare=False)
    requests: list[Request] = field(compare=False)
    answers: list[Answer] = field(compare=False)
    compute_s: float = field(compare=False)


class Lane:
    """One agent's share of a ``SharedBatcher``."""

    def __init__(
        self, pool: SharedBatcher, step: DeviceStep, on_batch: BatchCallback | None, compute_model: ComputeModel | None
    ) -> None:
        if not isinstance(step.model, TenantModel) or step.model.models is not pool.tenants:
            raise ValueError("a lane's step must answer with a tenant of the pool's shared model")
        self.pool = pool
        self.step = step
        self.on_batch = on_batch
        self.compute_model = compute_model
        self.free_at = -math.inf
        """When this lane's modelled device finishes the last batch it was given."""
        self._queued = 0
        self._count_lock = threading.Lock()
        self.stopped = False
        self.started = False
        self.batches = 0
        self.swap_pauses_s = pool.swap_pauses_s

    @property
    def slot(self) -> str:
        return self.step.model.slot  # type: ignore[union-attr]

    def start(self) -> None:
        self.started, self.stopped = True, False
        self.pool.attach(self)

    def stop(self, timeout: float = 10.0) -> None:
        """This agent's queued requests fail; the pool stops with its last lane."""
        self.stopped = True
        if self.started:
            self.started = False
            self.pool.detach(self, timeout)

    def submit(self, frame: Frame, source: str = "api") -> Future:
        if self.stopped or not self.started:
            raise BatcherStopped("agent is not serving")
        return self.pool.submit_for(self, frame, source)

    def between_batches(self, action: Callable[[], None]) -> Future:
        return self.pool.between_batches(action)

    def count(self, delta: int) -> None:
        """Requests of this lane waiting in the pool's queue (the agent's queue-depth gauge)."""
        with self._count_lock:
            self._queued += delta

    @property
    def depth(self) -> int:
        return self._queued

    @property
    def host_busy(self) -> bool:
        return self.pool.host_busy

    @property
    def alive(self) -> bool:
        return self.pool.alive


class SharedBatcher(MicroBatcher):
    """A ``MicroBatcher`` whose batches mix agents: one tower pass and one language-model pass per batch."""

    def __init__(self, tenants: TenantModels, max_batch: int = 32, max_wait_s: float = 0.0, max_queue: int = 65536):
        super().__init__(DeviceStep(tenants.shared), max_batch, max_wait_s, max_queue)  # type: ignore[arg-type]
        self.tenants = tenants
        self._releases: list[_Release] = []
        self._order = itertools.count()
        self._lanes = 0
        self._lanes_lock = threading.Lock()
        self.rows = 0

    # -- lanes ---------------------------------------------------------------------------------------------
    def lane(
        self, step: DeviceStep, on_batch: BatchCallback | None = None, compute_model: ComputeModel | None = None
    ) -> Lane:
        return Lane(self, step, on_batch, compute_model)

    def attach(self, lane: Lane) -> None:
        with self._lanes_lock:
            self._lanes += 1
            if self._thread is None:
                self._stop.clear()
                self.start()

    def detach(self, lane: Lane, timeout: float) -> None:
        with self._lanes_lock:
            self._lanes -= 1
            last = self._lanes == 0
        if last:
            self.stop(timeout)

    def submit_for(self, lane: Lane, frame: Frame, source: str) -> Future:
        if self._stop.is_set() or self._thread is None:
            raise BatcherStopped("agent is not serving")
        req = LaneRequest(frame, source, lane=lane)
        lane.count(1)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            lane.count(-1)
            raise BatcherBusy(f"request queue full ({self._queue.maxsize} waiting)") from None
        return req.future

    # -- the worker ----------------------------------------------------------------------------------------
    @property
    def host_busy(self) -> bool:
        if super().host_busy:
            return True
        releases = self._releases
        return bool(releases) and releases[0].due <= clocks.current().monotonic()

    def _between_batches(self) -> None:
        self._release_due()
        self._poll_s = 0.002 if self._releases else 0.02  # a release falls due while no request comes

    def _stopped(self) -> None:
        self._release_all()

    def _run_batch(self, batch: list[Request]) -> None:
        live: list[LaneRequest] = []
        for r in batch:
            lane = r.lane  # type: ignore[attr-defined]
            lane.count(-1)
            if lane.stopped:
                if r.future.set_running_or_notify_cancel():
                    r.future.set_exception(BatcherStopped("agent is stopping"))
            elif r.future.set_running_or_notify_cancel():
                live.append(r)  # type: ignore[arg-type]
        if not live:
            return
        clock = clocks.current()
        now = clock.monotonic()
        t0 = time.perf_counter()
        frames = [r.frame for r in live]
        questions = [f.question for f in frames]
        try:
            with self.tenants.lock:
                features, grids = self.step.stack_features(frames)
                slots = [r.lane.slot for r in live]  # type: ignore[union-attr]
                limits = [f.max_new_tokens for f in frames]
                passed = self.step.model_pass(features, questions, limits, slots, grids)
        except Exception as exc:  # one failing batch fails its requests, never the worker
            self._fail(live, exc)  # type: ignore[arg-type]
            return
        forward_s = time.perf_counter() - t0
        self.batches += 1
        self.rows += len(live)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(live):
            groups.setdefault(id(r.lane), []).append(i)
        for index in groups.values():
            lane: Lane = live[index[0]].lane  # type: ignore[assignment]
            reqs = [live[i] for i in index]
            try:
                answers = lane.step.decide(
                    passed.rows(index),
                    features[index] if isinstance(features, torch.Tensor) else [features[i] for i in index],
                    [questions[i] for i in index],
                    [frames[i].metadata for i in index],
                )
            except Exception as exc:
                log.exception("agent %s failed on its rows", lane.slot)
                for r in reqs:
                    r.future.set_exception(exc)
                continue
            lane.batches += 1
            share = forward_s * len(index) / len(live)
            if lane.compute_model is None:
                due, compute_s = now, share
            else:
                compute_s = lane.compute_model(len(index), share)
                due = max(now, lane.free_at) + compute_s
            lane.free_at = due
            heapq.heappush(self._releases, _Release(due, next(self._order), lane, reqs, answers, compute_s))
        self._release_due()

    def _release_due(self) -> None:
        now = clocks.current().monotonic()
        while self._releases and self._releases[0].due <= now:
            self._release(heapq.heappop(self._releases))

    def _release_all(self) -> None:
        while self._releases:
            self._release(heapq.heappop(self._releases))

    @staticmethod
    def _release(rel: _Release) -> None:
        for r, a in zip(rel.requests, rel.answers, strict=True):
            a.latency_s = rel.due - r.enqueued
        if rel.lane.on_batch is not None:
            try:
                rel.lane.on_batch(rel.requests, rel.answers, rel.compute_s)
            except Exception:  # observers never stop serving
                log.exception("batch observer failed")
        for r, a in zip(rel.requests, rel.answers, strict=True):
            r.future.set_result(a)
