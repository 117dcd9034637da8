"""Durable adaptation jobs: the interface (``job_store.SqlJobStore`` implements it on SQLite and PostgreSQL)
and the job record.

A job trains one *subject* (a device, or a cohort on its devices' pooled uploads) on the samples of given seq
ranges. States: ``queued -> running -> done | failed``; a failed attempt goes back to ``queued`` until
``max_attempts``. At most one job per subject is queued or running at any time (the store enforces it), and a
job left ``running`` by a killed service is requeued at start (``recover``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from common import clock as clocks
from common.errors import TandemError

JobState = Literal["queued", "running", "done", "failed"]
SubjectKind = Literal["device", "cohort"]
STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed")


def now_ms() -> int:
    """Wall-clock milliseconds, as jobs record their times."""
    return clocks.current().now_ms()


class JobError(TandemError):
    """A job cannot be created, found or steered (unknown id, subject already has an active job, ...)."""


@dataclass(frozen=True)
class SeqRange:
    """Samples of one device with ``after_seq < seq <= upto_seq``."""

    device_id: str
    after_seq: int
    upto_seq: int


@dataclass(frozen=True)
class NewJob:
    """What the scheduler asks for."""

    subject_kind: SubjectKind
    subject: str
    family: str
    ranges: tuple[SeqRange, ...]
    samples: int
    bytes: int
    reason: str


@dataclass(frozen=True)
class Job:
    """A stored job."""

    job_id: int
    subject_kind: SubjectKind
    subject: str
    family: str
    ranges: tuple[SeqRange, ...]
    samples: int
    bytes: int
    reason: str
    state: JobState
    attempts: int
    error: str = ""
    outcome: str = ""
    """For done jobs: ``published``, ``refused`` (validation gate), ``unchanged`` or ``skipped``."""
    update_id: int = 0
    result: dict = field(default_factory=dict)
    created_unix_ms: int = 0
    started_unix_ms: int = 0
    finished_unix_ms: int = 0

    @property
    def key(self) -> str:
        """``device:<id>`` or ``cohort:<name>``: the learner-state key of the subject."""
        return f"{self.subject_kind}:{self.subject}"


class JobStore(ABC):
    """Durable jobs and the per-device scheduling cursors."""

    @abstractmethod
    def create(self, job: NewJob) -> Job | None:
        """Store a queued job and advance its devices' cursors to the ranges' ends in one transaction; None (and
        nothing stored) when the subject already has a queued or running job."""

    @abstractmethod
    def claim(self, limit: int, max_attempts: int) -> list[Job]:
        """Move up to ``limit`` queued jobs (oldest first, attempts below ``max_attempts``) to running."""

    @abstractmethod
    def finish(self, job_id: int, outcome: str, result: dict, update_id: int = 0) -> Job:
        """Mark a running job done."""

    @abstractmethod
    def fail(self, job_id: int, error: str, max_attempts: int, permanent: bool = False) -> Job:
        """Record a failed attempt: back to queued while attempts remain (and not ``permanent``), else failed."""

    @abstractmethod
    def requeue(self, job_id: int, reason: str) -> bool:
        """Put a running job back in the queue (the attempt is not counted as failed); False if not running."""

    @abstractmethod
    def recover(self) -> list[int]:
        """Requeue jobs left running by a stopped service; returns their ids."""

    @abstractmethod
    def retry(self, job_id: int) -> Job:
        """Requeue a failed job with fresh attempts; JobError if it is not failed or its subject is busy."""

    @abstractmethod
    def get(self, job_id: int) -> Job | None:
        """The job, or None."""

    @abstractmethod
    def list(self, state: JobState | None = None, subject: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first, optionally filtered."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present)."""

    @abstractmethod
    def cursor(self, device_id: str) -> tuple[int, int]:
        """``(seq, unix_ms)``: the highest seq already given to a job, and when (0, 0 when never)."""

    @abstractmethod
    def cursors(self) -> dict[str, tuple[int, int]]:
        """Every device's ``cursor`` in one read (devices never given a job are absent)."""

    @abstractmethod
    def get_meta(self, key: str, default: str = "") -> str:
        """A small persisted value (e.g. an event cursor)."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Persist a small value."""

    @abstractmethod
    def close(self) -> None:
        """Release resources."""


def job_from_row(row: tuple) -> Job:
    """A job from a row of ``cloud.sql.jobs`` (all columns in table order; the JSON columns parsed)."""
    return Job(
        job_id=int(row[0]),
        subject_kind=row[1],
        subject=row[2],
        family=row[3],
        ranges=tuple(SeqRange(d, int(a), int(b)) for d, a, b in row[4]),
        samples=int(row[5]),
        bytes=int(row[6]),
        reason=row[7],
        state=row[8],
        attempts=int(row[9]),
        error=row[10],
        outcome=row[11],
        update_id=int(row[12]),
        result=dict(row[13]),
        created_unix_ms=int(row[14]),
        started_unix_ms=int(row[15]),
        finished_unix_ms=int(row[16]),
    )
