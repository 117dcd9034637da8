"""Schemas as the code before one migration list left them (frozen copies: the migration tests build old
databases from these, whatever the current code says)."""

from __future__ import annotations

from dataclasses import dataclass

SQLITE_DEVICES_V1 = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    cohort TEXT NOT NULL,
    model_family TEXT NOT NULL,
    model_version TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    registered_unix_ms INTEGER NOT NULL,
    applied_version TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    last_seen_unix_ms INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rollbacks (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    reason TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""
"""devices.db step 1 (user_version 1); main's code then added ``enrollment_sha256`` with an unversioned ALTER."""

SQLITE_SAMPLES_V1 = """
CREATE TABLE IF NOT EXISTS samples (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    segment INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID
"""
"""samples.db step 1: payloads in segment files ``samples.segments/<n:06d>.seg``, rows name (segment, offset)."""

SQLITE_UPDATES = (
    """
CREATE TABLE IF NOT EXISTS updates (
    update_id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    cohort TEXT NOT NULL,
    base_version TEXT NOT NULL,
    target_version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL,
    payload_info BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_device ON updates (device_id, update_id);
CREATE INDEX IF NOT EXISTS updates_cohort ON updates (cohort, update_id)
""",
    """
ALTER TABLE updates ADD COLUMN job_id INTEGER NOT NULL DEFAULT 0;
UPDATE updates SET job_id = CAST(json_extract(metadata, '$.job_id') AS INTEGER)
    WHERE json_extract(metadata, '$.job_id') IS NOT NULL;
CREATE UNIQUE INDEX updates_job ON updates (job_id) WHERE job_id > 0
""",
    """
ALTER TABLE updates ADD COLUMN blob_key TEXT NOT NULL DEFAULT '';
UPDATE updates SET blob_key = sha256
""",
)
"""updates.db's steps (user_version 1-3)."""

SQLITE_JOBS = (
    """
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
CREATE TABLE IF NOT EXISTS cursors (device_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, unix_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
""",
    "ALTER TABLE cursors RENAME TO job_cursors; ALTER TABLE meta RENAME TO job_meta",  # PostgreSQL's names
)
"""jobs.db: main's unversioned script (step 1), then the rename (step 2)."""


@dataclass(frozen=True)
class Migration:
    """An old PostgreSQL step."""

    version: int
    description: str
    sql: str


POSTGRES_GLOBAL = (
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
)
"""PostgreSQL's one global list (``tandem_schema_migrations`` versions 1-4)."""
