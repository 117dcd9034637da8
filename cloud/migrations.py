"""Versioned schema migrations, applied at start; a database newer than this code is refused untouched.

PostgreSQL: one ordered list for the whole database (samples, devices, updates, ...), recorded in
``tandem_schema_migrations`` and applied under an advisory lock, each in its own transaction, so gateways and
trainers starting together migrate once. SQLite: each store file keeps its own list, versioned by
``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import TandemError

if TYPE_CHECKING:
    import psycopg

MIGRATIONS_TABLE = "tandem_schema_migrations"
_LOCK_ID = 0x74616E64656D  # "tandem": the advisory lock that serialises migrations


class SchemaError(TandemError):
    """The database's schema is newer than this code (or a migration failed); nothing was written."""


@dataclass(frozen=True)
class Migration:
    """One schema step: ``version`` n turns schema n-1 into n."""

    version: int
    description: str
    sql: str


POSTGRES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "samples, devices and updates",
        """
        CREATE TABLE samples (
            device_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            blob_key TEXT NOT NULL,
            blob_offset BIGINT NOT NULL,
            length BIGINT NOT NULL,
            metadata JSONB NOT NULL,
            created_unix_ms BIGINT NOT NULL,
            received_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (device_id, seq)
        );
        CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            token_sha256 TEXT NOT NULL UNIQUE,
            cohort TEXT NOT NULL,
            model_family TEXT NOT NULL,
            model_version TEXT NOT NULL,
            capabilities JSONB NOT NULL,
            registered_unix_ms BIGINT NOT NULL,
            applied_version TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT '',
            metrics JSONB NOT NULL DEFAULT '{}',
            last_seen_unix_ms BIGINT NOT NULL DEFAULT 0,
            revoked BOOLEAN NOT NULL DEFAULT FALSE
        );
        CREATE TABLE updates (
            update_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            device_id TEXT NOT NULL,
            cohort TEXT NOT NULL,
            base_version TEXT NOT NULL,
            target_version TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size BIGINT NOT NULL,
            metadata JSONB NOT NULL,
            created_unix_ms BIGINT NOT NULL,
            signature BYTEA NOT NULL,
            key_id TEXT NOT NULL,
            payload_info BYTEA NOT NULL,
            blob_key TEXT NOT NULL
        );
        CREATE INDEX updates_device ON updates (device_id, update_id);
        CREATE INDEX updates_cohort ON updates (cohort, update_id);
        """,
    ),
    Migration(
        2,
        "trainer: jobs, scheduling cursors, metadata; device rollbacks",
        """
        CREATE TABLE jobs (
            job_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            subject_kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            family TEXT NOT NULL,
            ranges JSONB NOT NULL,
            samples BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            reason TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            error TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL DEFAULT '',
            update_id BIGINT NOT NULL DEFAULT 0,
            result JSONB NOT NULL DEFAULT '{}',
            created_unix_ms BIGINT NOT NULL,
            started_unix_ms BIGINT NOT NULL DEFAULT 0,
            finished_unix_ms BIGINT NOT NULL DEFAULT 0
        );
        CREATE UNIQUE INDEX jobs_one_active ON jobs (subject_kind, subject) WHERE state IN ('queued', 'running');
        CREATE INDEX jobs_state ON jobs (state, job_id);
        CREATE TABLE job_cursors (device_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, unix_ms BIGINT NOT NULL);
        CREATE TABLE job_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE rollbacks (
            event_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            device_id TEXT NOT NULL,
            from_version TEXT NOT NULL,
            to_version TEXT NOT NULL,
            reason TEXT NOT NULL,
            unix_ms BIGINT NOT NULL
        );
        """,
    ),
    Migration(
        3,
        "devices: one-time enrollment codes of provisioned devices",
        "ALTER TABLE devices ADD COLUMN enrollment_sha256 TEXT",
    ),
    Migration(
        4,
        "updates: the job that published each one, indexed (publishing a job twice is a no-op)",
        """
        ALTER TABLE updates ADD COLUMN job_id BIGINT NOT NULL DEFAULT 0;
        UPDATE updates SET job_id = (metadata->>'job_id')::bigint WHERE metadata ? 'job_id';
        CREATE UNIQUE INDEX updates_job ON updates (job_id) WHERE job_id > 0;
        """,
    ),
    Migration(
        5,
        "devices: the token epoch, bumped by every token change (gateways cache tokens)",
        (
            "CREATE TABLE device_epoch (id INTEGER PRIMARY KEY, epoch BIGINT NOT NULL);"
            " INSERT INTO device_epoch VALUES (1, 0)"
        ),
    ),
)


def _too_new(found: int, known: int, where: str) -> SchemaError:
    return SchemaError(
        f"{where} has schema version {found}, newer than this code knows ({known}); "
        "upgrade Tandem (nothing was written)"
    )


def postgres_version(conn: psycopg.Connection) -> int:
    """The schema version recorded in the database (0 for an empty one); reads only."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,))
        row = cur.fetchone()
        if not row or not row[0]:
            return 0
        cur.execute(f"SELECT COALESCE(MAX(version), 0) FROM {MIGRATIONS_TABLE}")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def migrate_postgres(conn: psycopg.Connection, migrations: Sequence[Migration] = POSTGRES_MIGRATIONS) -> int:
    """Bring the database to the newest version in ``migrations``; returns it. SchemaError if it is newer."""
    known = migrations[-1].version if migrations else 0
    where = f"PostgreSQL database {conn.info.dbname!r}"
    current = postgres_version(conn)  # refuse a newer schema before writing anything, even the version table
    if current > known:
        raise _too_new(current, known, where)
    if current == known:
        return current
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL, applied_unix_ms BIGINT NOT NULL)"
        )
        current = postgres_version(conn)  # another process may have migrated while we waited for the lock
        if current > known:
            raise _too_new(current, known, where)
        for m in migrations:
            if m.version > current:
                try:
                    cur.execute(m.sql.encode())
                except Exception as exc:
                    raise SchemaError(f"{where}: migration {m.version} ({m.description}) failed: {exc}") from exc
                cur.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} VALUES (%s, %s, %s)",
                    (m.version, m.description, int(time.time() * 1000)),
                )
    return known


def migrate_sqlite(
    conn: sqlite3.Connection, migrations: Sequence[str | Callable[[sqlite3.Connection], None]], where: str
) -> int:
    """Apply ``migrations[n:]`` to a SQLite file at ``user_version`` n, in one transaction; returns the version.

    ``migrations[0]`` is version 1; a step is SQL (statements separated by ``;``) or a function of the
    connection (for a step that depends on what the file holds). A file at a higher version than
    ``len(migrations)`` raises SchemaError.
    """
    known = len(migrations)
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > known:
        raise _too_new(current, known, where)
    if current == known:
        return current
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > known:
            raise _too_new(current, known, where)
        for step in migrations[current:]:
            if callable(step):
                step(conn)
                continue
            for statement in (s for s in step.split(";") if s.strip()):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {known}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return known
