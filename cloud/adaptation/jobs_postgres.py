"""PostgreSQL job store: the trainer's jobs, scheduling cursors and metadata in the cloud's shared database.

Same contract as ``SqliteJobStore``: at most one queued or running job per subject (a partial unique index),
each change one transaction. ``claim`` uses ``FOR UPDATE SKIP LOCKED``, so two trainers never run the same job;
``recover`` requeues every running job, which assumes one trainer service per database (as on a Ray head).
"""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from cloud.adaptation.jobs import (
    JOB_COLUMNS,
    STATES,
    Job,
    JobError,
    JobState,
    JobStore,
    NewJob,
    job_from_row,
    now_ms,
)
from cloud.db import PostgresDatabase


class PostgresJobStore(JobStore):
    """Jobs shared by every process of one cloud (the trainer writes, ``tandem-cloud jobs`` reads)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def create(self, job: NewJob) -> Job | None:
        now = now_ms()
        ranges = Jsonb([[r.device_id, r.after_seq, r.upto_seq] for r in job.ranges])
        with self.db.transaction() as cur:
            cur.execute(
                f"INSERT INTO jobs (subject_kind, subject, family, ranges, samples, bytes, reason, state,"
                " created_unix_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, 'queued', %s)"
                " ON CONFLICT (subject_kind, subject) WHERE state IN ('queued', 'running') DO NOTHING"
                f" RETURNING {JOB_COLUMNS}",
                (job.subject_kind, job.subject, job.family, ranges, job.samples, job.bytes, job.reason, now),
            )
            row = cur.fetchone()
            if row is None:  # the subject has an active job: nothing stored, cursors unchanged
                return None
            for r in job.ranges:
                cur.execute(
                    "INSERT INTO job_cursors (device_id, seq, unix_ms) VALUES (%s, %s, %s) ON CONFLICT (device_id)"
                    " DO UPDATE SET seq = GREATEST(job_cursors.seq, excluded.seq), unix_ms = excluded.unix_ms",
                    (r.device_id, r.upto_seq, now),
                )
        return _job(row)

    def claim(self, limit: int, max_attempts: int) -> list[Job]:
        with self.db.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_unix_ms = %s WHERE job_id IN"
                " (SELECT job_id FROM jobs WHERE state = 'queued' AND attempts < %s ORDER BY job_id LIMIT %s"
                f" FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}",
                (now_ms(), max_attempts, limit),
            )
            return sorted((_job(r) for r in cur.fetchall()), key=lambda j: j.job_id)

    def finish(self, job_id: int, outcome: str, result: dict, update_id: int = 0) -> Job:
        with self.db.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'done', outcome = %s, result = %s, update_id = %s, finished_unix_ms = %s"
                f" WHERE job_id = %s AND state = 'running' RETURNING {JOB_COLUMNS}",
                (outcome, Jsonb(result), update_id, now_ms(), job_id),
            )
            row = cur.fetchone()
        if row is None:
            raise JobError(f"job {job_id} is not running")
        return _job(row)

    def fail(self, job_id: int, error: str, max_attempts: int, permanent: bool = False) -> Job:
        with self.db.transaction() as cur:
            cur.execute("SELECT attempts, state FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,))
            row = cur.fetchone()
            if row is None or row[1] != "running":
                raise JobError(f"job {job_id} is not running")
            state = "failed" if permanent or int(row[0]) >= max_attempts else "queued"
            cur.execute(
                "UPDATE jobs SET state = %s, error = %s, finished_unix_ms = %s WHERE job_id = %s"
                f" RETURNING {JOB_COLUMNS}",
                (state, error[:2000], now_ms(), job_id),
            )
            out = cur.fetchone()
        assert out is not None
        return _job(out)

    def requeue(self, job_id: int, reason: str) -> bool:
        with self.db.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), error = %s"
                " WHERE job_id = %s AND state = 'running'",
                (reason, job_id),
            )
            return cur.rowcount == 1

    def recover(self) -> list[int]:
        with self.db.cursor() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'queued', error = 'service stopped mid-job' WHERE state = 'running'"
                " RETURNING job_id"
            )
            return sorted(int(r[0]) for r in cur.fetchall())

    def retry(self, job_id: int) -> Job:
        try:
            with self.db.transaction() as cur:
                cur.execute("SELECT state FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,))
                row = cur.fetchone()
                if row is None:
                    raise JobError(f"no job {job_id}")
                if row[0] != "failed":
                    raise JobError(f"job {job_id} is {row[0]}; only failed jobs can be retried")
                cur.execute(
                    f"UPDATE jobs SET state = 'queued', attempts = 0 WHERE job_id = %s RETURNING {JOB_COLUMNS}",
                    (job_id,),
                )
                out = cur.fetchone()
        except psycopg.errors.UniqueViolation:
            raise JobError(f"job {job_id}'s subject has a queued or running job; retry it later") from None
        assert out is not None
        return _job(out)

    def get(self, job_id: int) -> Job | None:
        with self.db.cursor() as cur:
            cur.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = %s", (job_id,))
            row = cur.fetchone()
        return _job(row) if row else None

    def list(self, state: JobState | None = None, subject: str | None = None, limit: int = 100) -> list[Job]:
        sql, args = f"SELECT {JOB_COLUMNS} FROM jobs WHERE TRUE", []
        if state is not None:
            sql += " AND state = %s"
            args.append(state)
        if subject is not None:
            sql += " AND subject = %s"
            args.append(subject)
        with self.db.cursor() as cur:
            cur.execute(sql + " ORDER BY job_id DESC LIMIT %s", [*args, limit])
            return [_job(r) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        with self.db.cursor() as cur:
            cur.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            found = {r[0]: int(r[1]) for r in cur.fetchall()}
        return {s: found.get(s, 0) for s in STATES}

    def cursor(self, device_id: str) -> tuple[int, int]:
        with self.db.cursor() as cur:
            cur.execute("SELECT seq, unix_ms FROM job_cursors WHERE device_id = %s", (device_id,))
            row = cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def get_meta(self, key: str, default: str = "") -> str:
        with self.db.cursor() as cur:
            cur.execute("SELECT value FROM job_meta WHERE key = %s", (key,))
            row = cur.fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.db.cursor() as cur:
            cur.execute(
                "INSERT INTO job_meta (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def close(self) -> None:
        self.db.close()


def _job(row: tuple) -> Job:
    return job_from_row(row, lambda value: value)  # JSONB arrives parsed
