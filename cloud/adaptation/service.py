"""The trainer service: a control loop whose steps survive each other's failures.

Each turn: read device rollbacks -> schedule due jobs -> dispatch queued jobs to free executor slots ->
collect finished jobs (publish, then make the learner state live, then mark the job done) -> refresh metrics.
A step that raises is logged and the loop goes on (like Ray Serve's control loop); a job's own failure is
recorded against the job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cloud.adaptation.catchup import publish_catch_up
from cloud.adaptation.config import AdaptationConfig
from cloud.adaptation.executor import Executor, Finished, WorkerLost
from cloud.adaptation.jobs import Job, JobStore
from cloud.adaptation.metrics import AdaptationMetrics
from cloud.adaptation.scheduler import Scheduler
from cloud.adaptation.state import LearnerStore
from cloud.adaptation.uploads import read_raw
from cloud.adaptation.worker import JobResult, JobSpec
from cloud.devices import Devices, RollbackEvent
from cloud.samples.base import SampleStore
from cloud.updates.base import UpdateRecord, UpdateRegistry
from common.errors import TandemError
from common.faults import fault_point
from common.update_header import header_from_json

log = logging.getLogger("tandem.adaptation")


class TrainerService:
    """Owns the scheduler, the job store and an executor; publishes through the update registry."""

    def __init__(
        self,
        config: AdaptationConfig,
        state_dir: str | Path,
        samples: SampleStore,
        devices: Devices,
        updates: UpdateRegistry,
        jobs: JobStore,
        executor: Executor,
        metrics: AdaptationMetrics | None = None,
        on_publish: Callable[[UpdateRecord], None] | None = None,
    ) -> None:
        self.config = config
        self.samples, self.devices, self.updates, self.jobs = samples, devices, updates, jobs
        self.executor = executor
        self.learners = LearnerStore(state_dir)
        self.metrics = metrics or AdaptationMetrics()
        self.on_publish = on_publish
        self.scheduler = Scheduler(config, samples, jobs)
        self.step_errors: dict[str, str] = {}
        self.epochs = int(config.akd.get("epochs", 3))
        requeued = jobs.recover()
        if requeued:
            log.info("requeued jobs left running by a stopped service: %s", requeued)

    # -- the loop --------------------------------------------------------------------------------------------
    def step(self, wait_s: float = 0.0) -> None:
        """One turn of the loop."""
        for name, fn in (
            ("rollbacks", self.read_rollbacks),
            ("schedule", self.schedule),
            ("dispatch", self.dispatch),
            ("collect", lambda: self.collect(wait_s)),
            ("metrics", lambda: self.metrics.set_job_counts(self.jobs.counts())),
        ):
            try:
                fn()
                self.step_errors.pop(name, None)
            except Exception as exc:
                self.step_errors[name] = f"{type(exc).__name__}: {exc}"
                log.exception("trainer step %s failed", name)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set."""
        while not stop.is_set():
            self.step(wait_s=self.config.poll_interval_s)
            if not self.busy():
                stop.wait(self.config.poll_interval_s)

    def busy(self) -> bool:
        return self.executor.free_slots() == 0

    def drain(self, grace_s: float) -> list[int]:
        """Stop taking jobs: let running ones finish (and publish) for up to ``grace_s`` seconds, then requeue
        those still running (a restarted service runs them again); returns the requeued ids."""
        deadline = time.monotonic() + grace_s
        while self.executor.running() and (left := deadline - time.monotonic()) > 0:
            try:
                self.collect(min(left, 0.5))
            except Exception:
                log.exception("collecting a finished job failed while stopping")
        requeued = [j for j in self.executor.running() if self.jobs.requeue(j, "service stopped mid-job")]
        if requeued:
            log.info("requeued jobs still running after %.0f s: %s", grace_s, requeued)
        return requeued

    def close(self) -> None:
        self.executor.close()

    # -- steps -----------------------------------------------------------------------------------------------
    def read_rollbacks(self) -> None:
        """Devices that rolled back: a device's next job rebases its mirror on the version it now holds; a
        cohort member (with cohort training) is sent the cohort's updates from that version (``catchup``)."""
        cursor = int(self.jobs.get_meta("rollback_cursor", "0"))
        for event in self.devices.rollbacks(after_id=cursor):
            log.info("device %s rolled back to %s (%s)", event.device_id, event.to_version, event.reason)
            device = self.devices.get(event.device_id)
            if self.config.cohort_training and device is not None and device.cohort:
                self.catch_up(event, device.cohort)
            else:
                self.jobs.set_meta(f"rebase:device:{event.device_id}", event.to_version)
            self.jobs.set_meta("rollback_cursor", str(event.event_id))

    def catch_up(self, event: RollbackEvent, cohort: str) -> None:
        """Publish to the member the cohort updates from the version it rolled back to."""
        sent = publish_catch_up(self.updates, event.device_id, cohort, event.to_version, event.event_id)
        if sent is None:
            log.warning("device %s holds %s, not on cohort %s's line: no catch-up", event.device_id,
                        event.to_version, cohort)  # fmt: skip
            return
        for record in sent:
            self.metrics.updates_published.inc()
            self.metrics.bytes_published.inc(record.size)
            if self.on_publish is not None:
                self.on_publish(record)
        if sent:
            log.info("device %s catches up with cohort %s: %s -> %s in %d updates", event.device_id, cohort,
                     event.to_version, sent[-1].target_version, len(sent))  # fmt: skip

    def schedule(self) -> list[int]:
        return self.scheduler.update(self.devices.list())

    def dispatch(self) -> None:
        free = self.executor.free_slots()
        if free <= 0:
            return
        for job in self.jobs.claim(free, self.config.max_attempts):
            try:
                self.executor.submit(self.spec(job))
            except Exception as exc:
                self._failed(job, exc, permanent=isinstance(exc, KeyError | TandemError))

    def spec(self, job: Job) -> JobSpec:
        """The job with its samples read from the store; KeyError for a family the config lacks."""
        if job.family not in self.config.families:
            raise KeyError(f"unknown model family {job.family!r} (configured: {sorted(self.config.families)})")
        rows = read_raw(self.samples, job.ranges, self.config.max_samples_per_job)
        rebase = self.jobs.get_meta(f"rebase:{job.key}") or None
        return JobSpec(job.job_id, job.key, job.subject_kind, job.subject, job.family, rows, self.budget(job), rebase)

    def budget(self, job: Job) -> int | None:
        """DWC byte budget: fixed in config, else seconds of the slowest member's reported downlink."""
        link = self.config.link
        if link.budget_bytes is not None:
            return link.budget_bytes
        rates = []
        for r in job.ranges:
            rec = self.devices.get(r.device_id)
            rate = float(rec.metrics.get("downlink_bytes_per_s", 0)) if rec else 0.0
            if rate > 0:
                rates.append(rate)
        if not rates:
            return None
        budget = max(int(min(rates) * link.seconds_of_link), link.min_bytes)
        return min(budget, link.max_bytes) if link.max_bytes else budget

    def collect(self, wait_s: float) -> None:
        for fin in self.executor.poll(wait_s):
            job = self.jobs.get(fin.spec.job_id)
            if job is None or job.state != "running":
                continue
            if fin.error is not None:
                self._failed(job, fin.error, permanent=False)
                continue
            try:
                self._finish(job, fin)
            except Exception as exc:
                self._failed(job, exc, permanent=False)

    # -- finishing -------------------------------------------------------------------------------------------
    def _finish(self, job: Job, fin: Finished) -> None:
        result: JobResult = fin.result  # type: ignore[assignment]
        update_id = 0
        if result.outcome == "published":
            record = self.publish(job, result)
            update_id = record.update_id
        rebased = result.outcome != "skipped" and fin.spec.rebase_to is not None
        if rebased and self.jobs.get_meta(f"rebase:{job.key}") == fin.spec.rebase_to:
            self.jobs.set_meta(f"rebase:{job.key}", "")
        self.jobs.finish(job.job_id, result.outcome, result.summary, update_id)
        self.metrics.observe(result.outcome, fin.seconds, result.summary, self.epochs)
        log.info("job %d (%s) %s: %s", job.job_id, job.key, result.outcome, json.dumps(result.summary)[:400])

    def publish(self, job: Job, result: JobResult) -> UpdateRecord:
        """Publish the job's update once: a record carrying this job id means it was already published."""
        record = self.updates.by_job(job.job_id)
        if record is None:
            header = header_from_json(result.header_json or "")
            record = self.updates.publish_header(header, result.payload or b"", job_id=job.job_id)
            self.metrics.updates_published.inc()
            self.metrics.bytes_published.inc(record.size)
            if self.on_publish is not None:
                self.on_publish(record)
        fault_point("cloud.after_publish")  # test-only: kill -9 between publish and commit (common/faults.py)
        if result.generation is not None:
            self.learners.promote(job.key, result.generation)
        return record

    def _failed(self, job: Job, exc: BaseException, permanent: bool) -> None:
        if isinstance(exc, WorkerLost):
            self.metrics.actor_restarts.inc()
        reason = f"{type(exc).__name__}: {exc}"
        after = self.jobs.fail(job.job_id, reason, self.config.max_attempts, permanent=permanent)
        log.warning("job %d (%s) attempt %d failed (%s): %s", job.job_id, job.key, job.attempts, after.state, reason)
