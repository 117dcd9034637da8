"""Micro-batching: concurrent requests wait up to ``max_wait`` to share one forward of up to ``max_batch`` frames.

One worker thread owns the model. Adapter swaps are queued and installed by that thread between two batches, so
a batch in flight always finishes on the version it started with and the next one runs on the new version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from common import clock as clocks
from common.errors import TandemError
from device.agent.step import Answer, DeviceStep, Frame

log = logging.getLogger("tandem.device.batcher")


class BatcherBusy(TandemError):
    """The request queue is full (back-pressure: try again later)."""


class BatcherStopped(TandemError):
    """The batcher is not running."""


@dataclass
class Request:
    """One queued frame and the future its answer resolves."""

    frame: Frame
    source: str = "api"
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=lambda: clocks.current().monotonic())


BatchCallback = Callable[[list[Request], list[Answer], float], None]
"""Called by the worker after each batch with the requests, their answers and the batch's forward time."""
ComputeModel = Callable[[int, float], float]
"""(frames in the batch, seconds the forward took here) -> seconds it takes on the modelled hardware (the
simulator's device profile)."""


class MicroBatcher:
    """Collects requests into batches and runs them through a DeviceStep on one worker thread."""

    def __init__(
        self,
        step: DeviceStep,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        on_batch: BatchCallback | None = None,
        compute_model: ComputeModel | None = None,
    ) -> None:
        self.step = step
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.on_batch = on_batch
        self.compute_model = compute_model
        """With a model, a batch's answers go out when the modelled compute has passed on the process's clock
        (virtual time in the simulator), and latencies are that clock's; without one, as measured."""
        self._in_batch = False
        self._pacing = False
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._swaps: queue.Queue[tuple[Callable[[], None], Future]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self._last_batch = 1
        self._poll_s = 0.02
        """Longest wall wait for a first request before the worker looks at its other duties again."""
        self.swap_pauses_s: list[float] = []

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tandem-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight, fail what is still queued, stop the worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            req.future.set_exception(BatcherStopped("agent is stopping"))

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """The worker thread is running (the agent's watchdog keep-alive checks this)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def host_busy(self) -> bool:
        """True while the host still has work queued or running here (not while a batch waits out its modelled
        compute time): the simulator waits for this before it lets virtual time pass."""
        if self._pacing:
            return False
        return self._in_batch or not self._queue.empty() or not self._swaps.empty()

    def submit(self, frame: Frame, source: str = "api") -> Future:
        """Queue one frame; the future resolves to its Answer."""
        if self._stop.is_set() or self._thread is None:
            raise BatcherStopped("agent is not serving")
        req = Request(frame, source)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise BatcherBusy(f"request queue full ({self._queue.maxsize} waiting)") from None
        return req.future

    def between_batches(self, action: Callable[[], None]) -> Future:
        """Run ``action`` on the worker between two batches (an adapter swap); the future resolves after it."""
        fut: Future = Future()
        self._swaps.put((action, fut))
        if self._thread is None:
            self._run_swaps()
        return fut

    def _run_swaps(self) -> None:
        while True:
            try:
                action, fut = self._swaps.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                action()  # runs even when its waiter gave up: a stored version must still be installed
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                error = exc
            self.swap_pauses_s.append(time.perf_counter() - t0)
            if fut.set_running_or_notify_cancel():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
            elif error is not None:
                log.error("between-batches action failed with nobody waiting: %s", error)

    def _collect(self) -> list[Request]:
        """Take what is queued (up to ``max_batch``); wait up to ``max_wait`` only for as many requests as the
        previous batch held, so a lone client never waits and concurrent clients keep sharing forwards."""
        try:
            first = self._queue.get(timeout=self._poll_s)
        except queue.Empty:
            return []
        self._in_batch = True  # before the queue looks empty to a watcher
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        target = min(self.max_batch, max(len(batch), self._last_batch))
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < target:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        self._last_batch = len(batch)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_swaps()
            self._between_batches()
            batch = self._collect()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            finally:
                self._in_batch = False
        self._run_swaps()
        self._stopped()

    @staticmethod
    def _fail(requests: list[Request], exc: Exception) -> None:
        """A batch that failed fails its requests (logged once), never the worker."""
        log.exception("batch of %d failed", len(requests))
        for r in requests:
            r.future.set_exception(exc)

    def _between_batches(self) -> None:
        """The worker's own work between two batches (a subclass's; none here)."""

    def _stopped(self) -> None:
        """The worker's last work once it stops (a subclass's; none here)."""

    def _run_batch(self, batch: list[Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        clock = clocks.current()
        started = clock.monotonic()
        t0 = time.perf_counter()
        try:
            answers = self.step.run([r.frame for r in live])
        except Exception as exc:  # one failing batch fails its requests, never the worker
            self._fail(live, exc)
            return
        forward_s = time.perf_counter() - t0
        self.batches += 1
        if self.compute_model is not None:
            forward_s = self.compute_model(len(live), forward_s)
            self._pacing = True
            try:
                clock.sleep_blocking(started + forward_s - clock.monotonic())
            finally:
                self._pacing = False
        done = clock.monotonic()
        for r, a in zip(live, answers, strict=True):
            a.latency_s = done - r.enqueued
        if self.on_batch is not None:  # before the answers go out, so counters include them
            try:
                self.on_batch(live, answers, forward_s)
            except Exception:  # observers never stop serving
                log.exception("batch observer failed")
        for r, a in zip(live, answers, strict=True):
            r.future.set_result(a)
