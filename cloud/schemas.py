"""Every store's schema as one ordered list of steps, the same on SQLite and PostgreSQL (``cloud.migrations``
applies them; ``cloud.sql`` names the tables the stores query).

The first steps are the tables as the first SQLite files held them (``IF NOT EXISTS``: a file from before
versioning is adopted as it is); later steps change them the same way on both databases. A PostgreSQL database
from before per-store lists (one global list, versions 1-4) is adopted at the versions it already holds.
"""

from __future__ import annotations

from sqlalchemy import Connection

from cloud.migrations import Migration, Schema, add_column


def _sqlite_file(known: int):
    """A SQLite file's old ``user_version`` counted this store's steps, as these lists do."""

    def adopt(dialect: str, old: int) -> int | None:
        if dialect == "sqlite":
            return old if old <= known else None
        return None

    return adopt


def _postgres_global(mapping: tuple[tuple[int, int], ...], sqlite_known: int):
    """PostgreSQL's old global version -> this store's version: the first ``(at least, version)`` that fits."""
    sqlite = _sqlite_file(sqlite_known)

    def adopt(dialect: str, old: int) -> int | None:
        if dialect == "sqlite":
            return sqlite(dialect, old)
        if old > 4:
            return None
        return next((version for at_least, version in mapping if old >= at_least), 0)

    return adopt


def _enrollment_codes(conn: Connection) -> None:
    add_column(conn, "devices", "enrollment_sha256", "TEXT")  # main's files had it from an unversioned ALTER


DEVICES = Schema(
    "devices",
    (
        Migration(1, "devices and their reported rollbacks", """
            CREATE TABLE IF NOT EXISTS devices (
                device_id TEXT PRIMARY KEY,
                token_sha256 TEXT NOT NULL UNIQUE,
                cohort TEXT NOT NULL,
                model_family TEXT NOT NULL,
                model_version TEXT NOT NULL,
                capabilities <JSON> NOT NULL,
                registered_unix_ms <BIGINT> NOT NULL,
                applied_version TEXT NOT NULL DEFAULT '',
                status TEXT NOT NULL DEFAULT '',
                metrics <JSON> NOT NULL DEFAULT '{}',
                last_seen_unix_ms <BIGINT> NOT NULL DEFAULT 0,
                revoked <BOOL> NOT NULL DEFAULT <FALSE>
            );
            CREATE TABLE IF NOT EXISTS rollbacks (
                event_id <ID>,
                device_id TEXT NOT NULL,
                from_version TEXT NOT NULL,
                to_version TEXT NOT NULL,
                reason TEXT NOT NULL,
                unix_ms <BIGINT> NOT NULL
            )"""),
        Migration(2, "one-time enrollment codes of provisioned devices", _enrollment_codes),
        Migration(3, "the token epoch, bumped by every token change (gateways cache tokens)", """
            CREATE TABLE device_epoch (id INTEGER PRIMARY KEY, epoch <BIGINT> NOT NULL);
            INSERT INTO device_epoch VALUES (1, 0)"""),
    ),
    _postgres_global(((3, 2), (2, 1)), sqlite_known=2),
)  # fmt: skip

SAMPLES = Schema(
    "samples",
    (
        Migration(1, "samples: one row per (device_id, seq), payload bytes in segment files", """
            CREATE TABLE IF NOT EXISTS samples (
                device_id TEXT NOT NULL,
                seq <BIGINT> NOT NULL,
                segment <BIGINT> NOT NULL,
                "offset" <BIGINT> NOT NULL,
                length <BIGINT> NOT NULL,
                metadata <JSON> NOT NULL,
                created_unix_ms <BIGINT> NOT NULL,
                received_unix_ms <BIGINT> NOT NULL,
                PRIMARY KEY (device_id, seq)
            ) <WITHOUT_ROWID>"""),
        Migration(2, "samples: payloads named by blob key and offset (segment files and blobs alike)", """
            CREATE TABLE samples_v2 (
                device_id TEXT NOT NULL,
                seq <BIGINT> NOT NULL,
                blob_key TEXT NOT NULL,
                blob_offset <BIGINT> NOT NULL,
                length <BIGINT> NOT NULL,
                metadata <JSON> NOT NULL,
                created_unix_ms <BIGINT> NOT NULL,
                received_unix_ms <BIGINT> NOT NULL,
                PRIMARY KEY (device_id, seq)
            ) <WITHOUT_ROWID>;
            INSERT INTO samples_v2 SELECT device_id, seq, CAST(segment AS TEXT), "offset", length, metadata,
                created_unix_ms, received_unix_ms FROM samples;
            DROP TABLE samples;
            ALTER TABLE samples_v2 RENAME TO samples"""),
    ),
    _postgres_global(((1, 2),), sqlite_known=1),
)  # fmt: skip


def _blob_keys(conn: Connection) -> None:
    add_column(conn, "updates", "blob_key", "TEXT NOT NULL DEFAULT ''")  # PostgreSQL's first tables had it
    conn.exec_driver_sql("UPDATE updates SET blob_key = sha256 WHERE blob_key = ''")


UPDATES = Schema(
    "updates",
    (
        Migration(1, "signed updates, by device and by cohort", """
            CREATE TABLE IF NOT EXISTS updates (
                update_id <ID>,
                device_id TEXT NOT NULL,
                cohort TEXT NOT NULL,
                base_version TEXT NOT NULL,
                target_version TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size <BIGINT> NOT NULL,
                metadata <JSON> NOT NULL,
                created_unix_ms <BIGINT> NOT NULL,
                signature <BYTES> NOT NULL,
                key_id TEXT NOT NULL,
                payload_info <BYTES> NOT NULL
            );
            CREATE INDEX IF NOT EXISTS updates_device ON updates (device_id, update_id);
            CREATE INDEX IF NOT EXISTS updates_cohort ON updates (cohort, update_id)"""),
        Migration(2, "the job that published each update, indexed (publishing a job twice is a no-op)", {
            "sqlite": """
                ALTER TABLE updates ADD COLUMN job_id INTEGER NOT NULL DEFAULT 0;
                UPDATE updates SET job_id = CAST(json_extract(metadata, '$.job_id') AS INTEGER)
                    WHERE json_extract(metadata, '$.job_id') IS NOT NULL;
                CREATE UNIQUE INDEX updates_job ON updates (job_id) WHERE job_id > 0""",
            "postgresql": """
                ALTER TABLE updates ADD COLUMN job_id BIGINT NOT NULL DEFAULT 0;
                UPDATE updates SET job_id = (metadata->>'job_id')::bigint WHERE metadata ? 'job_id';
                CREATE UNIQUE INDEX updates_job ON updates (job_id) WHERE job_id > 0""",
        }),
        Migration(3, "payloads named by blob key", _blob_keys),
    ),
    _postgres_global(((4, 3), (1, 1)), sqlite_known=3),
)  # fmt: skip

JOBS = Schema(
    "jobs",
    (
        Migration(1, "the trainer's jobs (one active per subject), scheduling cursors, metadata", """
            CREATE TABLE IF NOT EXISTS jobs (
                job_id <ID>,
                subject_kind TEXT NOT NULL,
                subject TEXT NOT NULL,
                family TEXT NOT NULL,
                ranges <JSON> NOT NULL,
                samples <BIGINT> NOT NULL,
                bytes <BIGINT> NOT NULL,
                reason TEXT NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                error TEXT NOT NULL DEFAULT '',
                outcome TEXT NOT NULL DEFAULT '',
                update_id <BIGINT> NOT NULL DEFAULT 0,
                result <JSON> NOT NULL DEFAULT '{}',
                created_unix_ms <BIGINT> NOT NULL,
                started_unix_ms <BIGINT> NOT NULL DEFAULT 0,
                finished_unix_ms <BIGINT> NOT NULL DEFAULT 0
            );
            CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active ON jobs (subject_kind, subject)
                WHERE state IN ('queued', 'running');
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, job_id);
            CREATE TABLE IF NOT EXISTS cursors (device_id TEXT PRIMARY KEY, seq <BIGINT> NOT NULL,
                unix_ms <BIGINT> NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"""),
        Migration(2, "scheduling cursors and metadata under their own names",
                  "ALTER TABLE cursors RENAME TO job_cursors; ALTER TABLE meta RENAME TO job_meta"),
    ),
    _postgres_global(((2, 2),), sqlite_known=2),
)  # fmt: skip

ALL = (DEVICES, SAMPLES, UPDATES, JOBS)
"""The shared PostgreSQL database holds every store; a SQLite file holds one."""
