"""SQLite job store (WAL, synchronous FULL): ``<state_dir>/jobs.db``."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

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
from cloud.db import open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    family TEXT NOT NULL,
    ranges TEXT NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT '',
    update_id INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL DEFAULT '{}',
    created_unix_ms INTEGER NOT NULL,
    started_unix_ms INTEGER NOT NULL DEFAULT 0,
    finished_unix_ms INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active ON jobs (subject_kind, subject)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, job_id);
CREATE TABLE IF NOT EXISTS cursors (
    device_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SqliteJobStore(JobStore):
    """Jobs, cursors and small metadata in one SQLite database; every change is one transaction."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._conn = open_sqlite(self.path, synchronous)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)

    def _tx(self):
        return _Tx(self._conn, self._lock)

    def create(self, job: NewJob) -> Job | None:
        ranges = json.dumps([[r.device_id, r.after_seq, r.upto_seq] for r in job.ranges])
        now = now_ms()
        with self._tx() as cur:
            try:
                cur.execute(
                    "INSERT INTO jobs (subject_kind, subject, family, ranges, samples, bytes, reason, state,"
                    " created_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                    (job.subject_kind, job.subject, job.family, ranges, job.samples, job.bytes, job.reason, now),
                )
            except sqlite3.IntegrityError:
                return None
            job_id = int(cur.lastrowid or 0)
            for r in job.ranges:
                cur.execute(
                    "INSERT INTO cursors (device_id, seq, unix_ms) VALUES (?, ?, ?) ON CONFLICT(device_id)"
                    " DO UPDATE SET seq = MAX(seq, excluded.seq), unix_ms = excluded.unix_ms",
                    (r.device_id, r.upto_seq, now),
                )
        return self._get(job_id)

    def claim(self, limit: int, max_attempts: int) -> list[Job]:
        now = now_ms()
        with self._tx() as cur:
            ids = [
                int(r[0])
                for r in cur.execute(
                    "SELECT job_id FROM jobs WHERE state = 'queued' AND attempts < ? ORDER BY job_id LIMIT ?",
                    (max_attempts, limit),
                ).fetchall()
            ]
            for job_id in ids:
                cur.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_unix_ms = ? WHERE job_id = ?",
                    (now, job_id),
                )
        return [self._get(i) for i in ids]

    def finish(self, job_id: int, outcome: str, result: dict, update_id: int = 0) -> Job:
        with self._tx() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'done', outcome = ?, result = ?, update_id = ?, finished_unix_ms = ?"
                " WHERE job_id = ? AND state = 'running'",
                (outcome, json.dumps(result, sort_keys=True), update_id, now_ms(), job_id),
            )
            if cur.rowcount != 1:
                raise JobError(f"job {job_id} is not running")
        return self._get(job_id)

    def fail(self, job_id: int, error: str, max_attempts: int, permanent: bool = False) -> Job:
        with self._tx() as cur:
            row = cur.execute("SELECT attempts, state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[1] != "running":
                raise JobError(f"job {job_id} is not running")
            state = "failed" if permanent or int(row[0]) >= max_attempts else "queued"
            cur.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_unix_ms = ? WHERE job_id = ?",
                (state, error[:2000], now_ms(), job_id),
            )
        return self._get(job_id)

    def requeue(self, job_id: int, reason: str) -> bool:
        with self._tx() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), error = ?"
                " WHERE job_id = ? AND state = 'running'",
                (reason, job_id),
            )
            return cur.rowcount == 1

    def recover(self) -> list[int]:
        with self._tx() as cur:
            ids = [int(r[0]) for r in cur.execute("SELECT job_id FROM jobs WHERE state = 'running'").fetchall()]
            cur.execute("UPDATE jobs SET state = 'queued', error = 'service stopped mid-job' WHERE state = 'running'")
        return ids

    def retry(self, job_id: int) -> Job:
        with self._tx() as cur:
            row = cur.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"no job {job_id}")
            if row[0] != "failed":
                raise JobError(f"job {job_id} is {row[0]}; only failed jobs can be retried")
            try:
                cur.execute("UPDATE jobs SET state = 'queued', attempts = 0 WHERE job_id = ?", (job_id,))
            except sqlite3.IntegrityError:
                raise JobError(f"job {job_id}'s subject has a queued or running job; retry it later") from None
        return self._get(job_id)

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def _get(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job is None:  # pragma: no cover - rows are never deleted
            raise JobError(f"no job {job_id}")
        return job

    def list(self, state: JobState | None = None, subject: str | None = None, limit: int = 100) -> list[Job]:
        sql, args = f"SELECT {JOB_COLUMNS} FROM jobs WHERE 1=1", []
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        if subject is not None:
            sql += " AND subject = ?"
            args.append(subject)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY job_id DESC LIMIT ?", [*args, limit]).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {r[0]: int(r[1]) for r in rows}
        return {s: found.get(s, 0) for s in STATES}

    def cursor(self, device_id: str) -> tuple[int, int]:
        with self._lock:
            row = self._conn.execute("SELECT seq, unix_ms FROM cursors WHERE device_id = ?", (device_id,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def get_meta(self, key: str, default: str = "") -> str:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Tx:
    """``with`` block: one IMMEDIATE transaction under the store's lock."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn, self.lock = conn, lock

    def __enter__(self) -> sqlite3.Cursor:
        self.lock.acquire()
        self.cur = self.conn.cursor()
        self.cur.execute("BEGIN IMMEDIATE")
        return self.cur

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.cur.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def _job(row: tuple) -> Job:
    return job_from_row(row, json.loads)
