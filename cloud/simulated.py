"""The cloud on virtual time: what ``tandem-cloud serve`` does when a fleet simulator drives its clock.

With ``simulation`` in the config the service reads time from the simulator's shared clock file
(``common.clock.SharedClock``) and:

- the trainer runs one loop turn per tick of that clock (:class:`LockstepTrainer`) and acknowledges it, so the
  scheduler sees exactly the samples stored by that virtual moment, whatever the host's speed;
- a job's update is published at its start + the modelled duration on the profiled cluster
  (:class:`ModelledExecutor`), never earlier; while it is due but not yet finished on this host, the acknowledged
  barrier holds the simulator's time there;
- the gateway counts the calls it is still working on (:class:`CallCounter`), so the simulator lets time pass
  only once the cloud has answered what reached it.

Deployment never sets ``simulation``; nothing here runs then.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import grpc

from cloud.adaptation.executor import Executor, Finished
from cloud.config import SimulationConfig
from common.clock import POLL_S, SharedClock, SharedClockFile

log = logging.getLogger("tandem.cloud.simulated")


class ModelledExecutor(Executor):
    """Wraps the real executor: at most ``gpus`` jobs at once in virtual time, each finished at its modelled time.

    The modelled cluster's concurrency does not depend on the host's: a job starts in virtual time when a modelled
    GPU is free, and waits here until the real executor has a slot; while it is due but not finished, the
    barrier holds virtual time.
    """

    def __init__(self, inner: Executor, config: SimulationConfig, clock: SharedClock, epochs: int) -> None:
        self.inner, self.config, self.clock, self.epochs = inner, config, clock, epochs
        self.due: dict[int, float] = {}
        """job id -> virtual second its update becomes visible (running or held)."""
        self._held: list[Finished] = []
        self._waiting: list = []
        """Started in virtual time, not yet handed to the real executor (it has fewer slots than GPUs)."""
        self.started: dict[int, float] = {}

    def free_slots(self) -> int:
        if self.config.host:
            return self.inner.free_slots()
        return max(0, self.config.gpus - len(self.due))

    def submit(self, spec) -> None:
        seconds = self.config.job_seconds(len(spec.rows), self.epochs)
        self.started[spec.job_id] = self.clock.monotonic()
        self.due[spec.job_id] = math.inf if self.config.host else self.started[spec.job_id] + seconds
        log.info("job %d: %d samples, modelled %.1f s", spec.job_id, len(spec.rows), seconds)
        self._waiting.append(spec)
        self._pump()

    def _pump(self) -> None:
        while self._waiting and self.inner.free_slots() > 0:
            self.inner.submit(self._waiting.pop(0))

    def poll(self, timeout: float) -> list[Finished]:
        finished = self.inner.poll(timeout)
        self._pump()
        if self.config.host:  # visible after what it took here (never before now: time already passed)
            for f in finished:
                self.due[f.spec.job_id] = self.started.get(f.spec.job_id, 0.0) + f.seconds
        self._held.extend(finished)
        now = self.clock.monotonic()
        ready = [f for f in self._held if self.due.get(f.spec.job_id, 0.0) <= now]
        self._held = [f for f in self._held if f not in ready]
        for f in ready:
            self.due.pop(f.spec.job_id, None)
            f.seconds = now - self.started.pop(f.spec.job_id, now)
        return ready

    def running(self) -> list[int]:
        """Jobs started in virtual time and not yet returned (running here, waiting for a slot, or held)."""
        return list(self.due)

    def barrier(self) -> float:
        """The earliest virtual second at which a job falls due (inf: none running)."""
        return min((d for d in self.due.values() if not self.config.host), default=math.inf)

    def close(self) -> None:
        self.inner.close()


class LockstepTrainer:
    """Runs the trainer's loop once per tick of the simulator's clock and acknowledges each tick."""

    def __init__(self, trainer, executor: ModelledExecutor, clock: SharedClock) -> None:
        self.trainer, self.executor, self.clock = trainer, executor, clock

    def run(self, stop: threading.Event) -> None:
        seen = -1
        file: SharedClockFile = self.clock.file
        while not stop.is_set():
            tick = file.tick()
            if tick == seen:
                time.sleep(POLL_S)
                continue
            seen = tick
            self.trainer.step(wait_s=0.0)
            file.ack(tick, self.executor.barrier())


def lockstep(trainer, config, clock: SharedClock) -> LockstepTrainer:
    """Put ``trainer`` (a ``TrainerService``) on the simulator's clock and modelled cluster."""
    executor = ModelledExecutor(trainer.executor, config.simulation, clock, trainer.epochs)
    trainer.executor = executor
    return LockstepTrainer(trainer, executor, clock)


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the gateway's calls in progress (all but the long-lived watch) into the shared clock file."""

    LONG_LIVED = ("/WatchUpdates",)

    def __init__(self, file: SharedClockFile) -> None:
        self.file = file
        self.active = 0
        self._lock = threading.Lock()

    def _add(self, n: int) -> None:
        with self._lock:
            self.active += n
            self.file.set_calls(self.active)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.endswith(self.LONG_LIVED):
            return handler
        return _counted(handler, self)


def _counted(handler, counter: CallCounter):
    """The same handler, its behaviour bracketed by the counter: a call counts while the server works on it, not
    while it waits for the client's next message or for its own message to be taken."""

    def unary(fn):
        async def run(request, context):
            counter._add(1)
            try:
                return await fn(request, context)
            finally:
                counter._add(-1)

        return run

    def client_stream(fn):
        async def run(request_iterator, context):
            counter._add(1)
            try:
                return await fn(_uncounted_reads(request_iterator, counter), context)
            finally:
                counter._add(-1)

        return run

    def server_stream(fn):
        async def run(request_or_iterator, context):
            counter._add(1)
            try:
                async for item in fn(request_or_iterator, context):
                    counter._add(-1)
                    try:
                        yield item
                    finally:
                        counter._add(1)
            finally:
                counter._add(-1)

        return run

    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(client_stream(handler.stream_unary), de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(server_stream(handler.unary_stream), de, ser)
    return grpc.stream_stream_rpc_method_handler(server_stream(handler.stream_stream), de, ser)


async def _uncounted_reads(iterator, counter: CallCounter):
    """``iterator``'s messages; the wait for each is not counted as the server's work."""
    while True:
        counter._add(-1)
        try:
            item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        finally:
            counter._add(1)
        yield item
