"""The job store on SQL (SQLAlchemy Core): the trainer's jobs, scheduling cursors and metadata in a SQLite file
(``<state_dir>/jobs.db``) or in the cloud's shared PostgreSQL database.

At most one queued or running job per subject (a partial unique index); each change is one transaction.
``claim`` locks the rows it takes (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two trainers never run the same
job; SQLite's ``BEGIN IMMEDIATE`` already serialises writers). ``recover`` requeues every running job, which
assumes one trainer service per database (as on a Ray head).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, case, func, select, update
from sqlalchemy.exc import IntegrityError

from cloud import sql
from cloud.adaptation.jobs import STATES, Job, JobError, JobState, JobStore, NewJob, job_from_row, now_ms
from cloud.migrations import migrated_sqlite
from cloud.schemas import JOBS

_J = sql.jobs.c
_COLUMNS = tuple(sql.jobs.c)
_BUSY = "subject has a queued or running job"


class SqlJobStore(JobStore):
    """Jobs in one SQL database (SQLite for one trainer beside its gateway, PostgreSQL shared)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, job: NewJob) -> Job | None:
        now = now_ms()
        ranges = [[r.device_id, r.after_seq, r.upto_seq] for r in job.ranges]
        values = dict(
            subject_kind=job.subject_kind,
            subject=job.subject,
            family=job.family,
            ranges=ranges,
            samples=job.samples,
            bytes=job.bytes,
            reason=job.reason,
            state="queued",
            created_unix_ms=now,
        )
        try:
            with sql.write(self.engine) as conn:
                row = conn.execute(sql.jobs.insert().values(**values).returning(*_COLUMNS)).one()
                for r in job.ranges:
                    stmt = sql.upsert(conn, sql.job_cursors).values(device_id=r.device_id, seq=r.upto_seq, unix_ms=now)
                    seq = sql.job_cursors.c.seq
                    newer = case((seq > stmt.excluded.seq, seq), else_=stmt.excluded.seq)
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=["device_id"], set_={"seq": newer, "unix_ms": stmt.excluded.unix_ms}
                        )
                    )
        except IntegrityError:  # the subject has an active job: nothing stored, cursors unchanged
            return None
        return _job(row)

    def claim(self, limit: int, max_attempts: int) -> list[Job]:
        with sql.write(self.engine) as conn:
            due = select(_J.job_id).where(_J.state == "queued", _J.attempts < max_attempts)
            ids = conn.execute(due.order_by(_J.job_id).limit(limit).with_for_update(skip_locked=True)).scalars().all()
            if not ids:
                return []
            started = dict(state="running", attempts=_J.attempts + 1, started_unix_ms=now_ms())
            rows = conn.execute(update(sql.jobs).where(_J.job_id.in_(ids)).values(**started).returning(*_COLUMNS))
            return sorted((_job(r) for r in rows), key=lambda j: j.job_id)

    def _running(self, job_id: int, **values) -> Job | None:
        """Set ``values`` on a running job in one statement; the job after, or None if it was not running."""
        with sql.write(self.engine) as conn:
            stmt = update(sql.jobs).where(_J.job_id == job_id, _J.state == "running").values(**values)
            row = conn.execute(stmt.returning(*_COLUMNS)).first()
        return _job(row) if row else None

    def finish(self, job_id: int, outcome: str, result: dict, update_id: int = 0) -> Job:
        done = self._running(job_id, state="done", outcome=outcome, result=result, update_id=update_id,
                             finished_unix_ms=now_ms())  # fmt: skip
        if done is None:
            raise JobError(f"job {job_id} is not running")
        return done

    def fail(self, job_id: int, error: str, max_attempts: int, permanent: bool = False) -> Job:
        after = "failed" if permanent else case((_J.attempts >= max_attempts, "failed"), else_="queued")
        failed = self._running(job_id, state=after, error=error[:2000], finished_unix_ms=now_ms())
        if failed is None:
            raise JobError(f"job {job_id} is not running")
        return failed

    def requeue(self, job_id: int, reason: str) -> bool:
        attempts = case((_J.attempts > 0, _J.attempts - 1), else_=0)
        return self._running(job_id, state="queued", attempts=attempts, error=reason) is not None

    def recover(self) -> list[int]:
        with sql.write(self.engine) as conn:
            stmt = update(sql.jobs).where(_J.state == "running").values(state="queued", error="service stopped mid-job")
            return sorted(int(i) for i in conn.execute(stmt.returning(_J.job_id)).scalars())

    def retry(self, job_id: int) -> Job:
        try:
            with sql.write(self.engine) as conn:
                state = conn.execute(select(_J.state).where(_J.job_id == job_id).with_for_update()).scalar()
                if state is None:
                    raise JobError(f"no job {job_id}")
                if state != "failed":
                    raise JobError(f"job {job_id} is {state}; only failed jobs can be retried")
                stmt = update(sql.jobs).where(_J.job_id == job_id).values(state="queued", attempts=0)
                row = conn.execute(stmt.returning(*_COLUMNS)).one()
        except IntegrityError:
            raise JobError(f"job {job_id}'s {_BUSY}; retry it later") from None
        return _job(row)

    def get(self, job_id: int) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_COLUMNS).where(_J.job_id == job_id)).first()
        return _job(row) if row else None

    def list(self, state: JobState | None = None, subject: str | None = None, limit: int = 100) -> list[Job]:
        query = select(*_COLUMNS)
        if state is not None:
            query = query.where(_J.state == state)
        if subject is not None:
            query = query.where(_J.subject == subject)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(_J.job_id.desc()).limit(limit)).all()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            found = dict(conn.execute(select(_J.state, func.count()).group_by(_J.state)).tuples().all())
        return {s: int(found.get(s, 0)) for s in STATES}

    def cursor(self, device_id: str) -> tuple[int, int]:
        c = sql.job_cursors.c
        with self.engine.connect() as conn:
            row = conn.execute(select(c.seq, c.unix_ms).where(c.device_id == device_id)).first()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def cursors(self) -> dict[str, tuple[int, int]]:
        c = sql.job_cursors.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(c.device_id, c.seq, c.unix_ms)).all()
        return {str(d): (int(seq), int(ms)) for d, seq, ms in rows}

    def get_meta(self, key: str, default: str = "") -> str:
        c = sql.job_meta.c
        with self.engine.connect() as conn:
            value = conn.execute(select(c.value).where(c.key == key)).scalar()
        return default if value is None else str(value)

    def set_meta(self, key: str, value: str) -> None:
        with sql.write(self.engine) as conn:
            stmt = sql.upsert(conn, sql.job_meta).values(key=key, value=value)
            conn.execute(stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value}))

    def close(self) -> None:
        self.engine.dispose()


class SqliteJobStore(SqlJobStore):
    """The job store of one trainer beside its gateway: ``jobs.db`` (WAL) at ``path``."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        super().__init__(migrated_sqlite(self.path, synchronous, JOBS, "job store"))


def _job(row) -> Job:
    return job_from_row(tuple(row))
