"""The scheduler: turns newly stored samples into jobs, per device or per cohort, by count, bytes or interval."""

from __future__ import annotations

from dataclasses import dataclass

from cloud.adaptation.config import AdaptationConfig, TriggerConfig
from cloud.adaptation.jobs import JobStore, NewJob, SeqRange
from cloud.devices import DeviceRecord
from cloud.samples.base import SampleStore
from common import clock as clocks


@dataclass
class Pending:
    """New samples of one device since its cursor."""

    device_id: str
    after_seq: int
    upto_seq: int
    samples: int
    bytes: int
    last_job_ms: int




def _due(trigger: TriggerConfig, parts: list[Pending], now_ms: int) -> str | None:
    samples = sum(p.samples for p in parts)
    size = sum(p.bytes for p in parts)
    if samples >= trigger.min_samples:
        return f"{samples} new samples"
    if trigger.min_bytes is not None and size >= trigger.min_bytes:
        return f"{size} new bytes"
    last = max(p.last_job_ms for p in parts)
    if samples and now_ms - last >= trigger.max_interval_s * 1000:
        return f"{samples} new samples after {trigger.max_interval_s:g} s"
    return None


class Scheduler:
    """One ``update()`` per loop turn creates every job that is due (at most one active job per subject).

    A turn reads every device's stored high-water and job cursor in one query each, and asks the sample store
    for a device's pending samples only when one of the two moved since it last asked: a turn over a thousand
    quiet devices costs two queries, not two thousand."""

    def __init__(self, config: AdaptationConfig, samples: SampleStore, jobs: JobStore) -> None:
        self.config = config
        self.samples = samples
        self.jobs = jobs
        self.started_ms = clocks.current().now_ms()
        self._known: dict[str, tuple[int, int, Pending | None]] = {}
        """device -> (cursor, high-water, its pending samples) when last asked."""

    def _pending(self, device_id: str, cursor: tuple[int, int], high: int, limit: int) -> Pending | None:
        after, last_ms = cursor
        if high <= after:
            return None
        known = self._known.get(device_id)
        if known is not None and known[0] == after and known[1] == high:
            pending = known[2]
        else:
            stats = self.samples.pending_stats(device_id, after, limit)
            pending = Pending(device_id, after, stats.upto_seq, stats.count, stats.bytes, 0) if stats.count else None
            self._known[device_id] = (after, high, pending)
        if pending is None:
            return None
        return Pending(pending.device_id, after, pending.upto_seq, pending.samples, pending.bytes, last_ms)

    def subjects(self, devices: list[DeviceRecord]) -> dict[tuple[str, str], list[DeviceRecord]]:
        """``(kind, subject) -> devices``: cohorts when cohort training is on, else one subject per device."""
        out: dict[tuple[str, str], list[DeviceRecord]] = {}
        for d in devices:
            if d.revoked:
                continue
            key = ("cohort", d.cohort) if self.config.cohort_training and d.cohort else ("device", d.device_id)
            out.setdefault(key, []).append(d)
        return out

    def update(self, devices: list[DeviceRecord], now_ms: int | None = None) -> list[int]:
        """Create the jobs that are due; returns their ids."""
        now = clocks.current().now_ms() if now_ms is None else now_ms
        created = []
        limit = self.config.max_samples_per_job
        highs, cursors = self.samples.high_waters(), self.jobs.cursors()
        for (kind, subject), members in sorted(self.subjects(devices).items()):
            parts = [
                p
                for d in members
                if (p := self._pending(d.device_id, cursors.get(d.device_id, (0, 0)), highs.get(d.device_id, 0), limit))
                is not None
            ]
            if not parts:
                continue
            trigger = self.config.cohort_trigger if kind == "cohort" else self.config.trigger
            for p in parts:  # a subject never scheduled counts its interval from the service's start
                p.last_job_ms = p.last_job_ms or self.started_ms
            reason = _due(trigger, parts, now)
            if reason is None:
                continue
            families = {d.model_family for d in members}
            family = sorted(families)[0]
            job = self.jobs.create(
                NewJob(
                    subject_kind=kind,  # type: ignore[arg-type]
                    subject=subject,
                    family=family,
                    ranges=tuple(SeqRange(p.device_id, p.after_seq, p.upto_seq) for p in parts),
                    samples=sum(p.samples for p in parts),
                    bytes=sum(p.bytes for p in parts),
                    reason=reason if len(families) == 1 else f"{reason}; mixed families {sorted(families)}",
                )
            )
            if job is not None:
                created.append(job.job_id)
        return created
