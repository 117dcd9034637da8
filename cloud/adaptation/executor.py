"""Where jobs run: the executor seam (in-process here, Ray in ``ray_executor``), like Flower's Backend."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from cloud.adaptation.config import AdaptationConfig
from cloud.adaptation.worker import JobResult, JobSpec, LocalLabeler, Worker
from common.errors import TandemError


class WorkerLost(TandemError):
    """The process running a job died (its state on disk is intact; the job is retried)."""


@dataclass
class Finished:
    """A job the executor is done with: a result, or the exception it raised."""

    spec: JobSpec
    result: JobResult | None
    error: BaseException | None
    seconds: float


class Executor(ABC):
    """Runs JobSpecs; the service submits up to ``free_slots()`` and collects with ``poll``."""

    on_start: Callable[[], None] | None = None
    """Called (on the submitting thread) once the backend has started: Ray's driver installs its own signal
    handlers in ``ray.init``, so the process puts its own back here."""

    @abstractmethod
    def free_slots(self) -> int:
        """How many more jobs can start now."""

    @abstractmethod
    def submit(self, spec: JobSpec) -> None:
        """Start a job."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Finished]:
        """Jobs that finished (waits up to ``timeout`` seconds for the first)."""

    @abstractmethod
    def running(self) -> list[int]:
        """Ids of the jobs submitted and not yet returned by ``poll``."""

    @abstractmethod
    def close(self) -> None:
        """Stop workers and release resources."""


class InProcessExecutor(Executor):
    """One worker thread in this process, teachers loaded here: the executor without any Ray."""

    def __init__(self, config: AdaptationConfig, state_dir: str | Path, worker: Worker | None = None) -> None:
        self.worker = worker or Worker(config, state_dir, LocalLabeler(config))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-learner")
        self._running: dict[Future, tuple[JobSpec, float]] = {}

    def free_slots(self) -> int:
        return 0 if self._running else 1

    def submit(self, spec: JobSpec) -> None:
        self._running[self._pool.submit(self.worker.run, spec)] = (spec, time.perf_counter())

    def poll(self, timeout: float) -> list[Finished]:
        if not self._running:
            return []
        done, _ = wait(list(self._running), timeout=timeout)
        out = []
        for fut in done:
            spec, start = self._running.pop(fut)
            exc = fut.exception()
            out.append(Finished(spec, None if exc else fut.result(), exc, time.perf_counter() - start))
        return out

    def running(self) -> list[int]:
        return [spec.job_id for spec, _ in self._running.values()]

    def close(self) -> None:
        self._pool.shutdown(wait=not self._running, cancel_futures=True)  # a requeued job's thread is not awaited
