"""Versioned schema migrations: applied at start, once, by whichever process comes first; a database whose
schema is newer than the code is refused with a clear error and left exactly as it was."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import threading

import pytest
from store_support import make_backend, pg_dsn  # noqa: F401 (fixture)
from transport_support import REPO_ROOT

from cloud.db import PostgresDatabase, connect_postgres
from cloud.devices import DeviceRegistry
from cloud.migrations import (
    MIGRATIONS_TABLE,
    POSTGRES_MIGRATIONS,
    Migration,
    SchemaError,
    migrate_postgres,
    postgres_version,
)
from cloud.samples import Sample, SqliteSampleStore
from cloud.stores import open_stores
from common.signing import generate_private_key

LATEST = POSTGRES_MIGRATIONS[-1].version


@pytest.fixture
def dsn(request):
    """A fresh database on the session's PostgreSQL."""
    return request.getfixturevalue("pg_dsn")


def _catalog(dsn: str) -> list[tuple]:
    """Every table with its row count, and the recorded versions: what a write would change."""
    with connect_postgres(dsn) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        counts = [(t, conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in tables]
        versions = conn.execute(f"SELECT version, description FROM {MIGRATIONS_TABLE} ORDER BY 1").fetchall()
    return counts + versions


def test_postgres_migrates_a_fresh_database_once(dsn):
    db = PostgresDatabase(dsn)
    db.close()
    again = PostgresDatabase(dsn)  # already current: nothing to do
    again.close()
    with connect_postgres(dsn) as conn:
        assert postgres_version(conn) == LATEST
        assert conn.execute(f"SELECT COUNT(*) FROM {MIGRATIONS_TABLE}").fetchone()[0] == LATEST
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"samples", "devices", "updates", MIGRATIONS_TABLE} <= tables


def test_postgres_processes_starting_together_migrate_once(dsn):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            PostgresDatabase(dsn, application_name="racer").close()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with connect_postgres(dsn) as conn:
        rows = conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE} ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == list(range(1, LATEST + 1))


def test_postgres_applies_only_missing_steps_and_a_failed_step_changes_nothing(dsn):
    one = (Migration(1, "a", "CREATE TABLE a (x INT)"),)
    two = (*one, Migration(2, "b", "CREATE TABLE b (y INT); INSERT INTO a VALUES (1)"))
    broken = (*two, Migration(3, "c", "CREATE TABLE c (z INT); SELECT no_such_function()"))
    with connect_postgres(dsn) as conn:
        assert migrate_postgres(conn, one) == 1
        assert migrate_postgres(conn, two) == 2  # only step 2 runs: a second CREATE TABLE a would fail
        assert conn.execute("SELECT COUNT(*) FROM a").fetchone()[0] == 1
        with pytest.raises(SchemaError, match="migration 3 \\(c\\) failed"):
            migrate_postgres(conn, broken)
        assert postgres_version(conn) == 2
        assert conn.execute("SELECT to_regclass('c')").fetchone()[0] is None  # rolled back with its step


def _sqlite_files(backend) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(backend.data_dir().rglob("*.db"))}


def _make_newer(backend) -> None:
    """State written by a future Tandem: schema version 99."""
    if backend.name == "sqlite":
        for path in backend.data_dir().glob("*.db"):
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA user_version = 99")
            conn.close()
        for path in backend.data_dir().glob("*/*.db"):
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA user_version = 99")
            conn.close()
        return
    with connect_postgres(backend.store_fields["postgres_dsn"]) as conn:
        conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} VALUES (99, 'from the future', 0)")


def _snapshot(backend):
    return _sqlite_files(backend) if backend.name == "sqlite" else _catalog(backend.store_fields["postgres_dsn"])


@pytest.mark.parametrize("name", ["sqlite", "postgres-dir"])
def test_newer_schema_is_refused_clearly_and_nothing_is_written(name, tmp_path, request):
    from cloud.config import GatewayConfig
    from cloud.gateway.server import load_or_create_signing_key

    backend = make_backend(name, tmp_path / "state", request)
    cfg = GatewayConfig(**backend.fields())
    stores = open_stores(cfg, cfg.data_dir, load_or_create_signing_key(cfg))  # a cloud that ran before
    stores.samples.put([Sample("dev-1", 1, b"kept")])
    stores.close()
    _make_newer(backend)
    before = _snapshot(backend)
    with pytest.raises(SchemaError, match="schema version 99, newer than this code knows .*nothing was written"):
        open_stores(cfg, cfg.data_dir, generate_private_key())
    config = backend.write_config(tmp_path / "gateway.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.cli", "serve", "--config", str(config), "--port", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "schema version 99, newer than this code knows" in lines[0], proc.stderr
    assert _snapshot(backend) == before


def test_sqlite_file_from_before_versioning_is_adopted_with_its_rows(tmp_path):
    path = tmp_path / "devices.db"
    conn = sqlite3.connect(path, isolation_level=None)
    from cloud.devices import _SCHEMA

    conn.executescript(_SCHEMA)  # what the code before migrations created (user_version 0)
    conn.execute(
        "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
        " registered_unix_ms) VALUES ('old', 'h', '', 'f', 'v', '{}', 1)"
    )
    conn.close()
    reg = DeviceRegistry(path)
    assert [d.device_id for d in reg.list()] == ["old"]
    reg.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3  # schema, enrollment codes, token epoch
    conn.close()
    store = SqliteSampleStore(tmp_path / "samples.db")
    store.close()


def test_a_devices_file_made_by_the_code_before_the_sql_layer_migrates_in_place(tmp_path):
    """devices.db as main's code left it (schema step 1, then an unversioned ALTER for enrollment codes): the
    versioned step 2 adopts it with every row, token and code intact."""
    path = tmp_path / "devices.db"
    conn = sqlite3.connect(path, isolation_level=None)
    from cloud.devices import _SCHEMA

    conn.executescript(_SCHEMA)
    conn.execute("ALTER TABLE devices ADD COLUMN enrollment_sha256 TEXT")
    conn.execute("PRAGMA user_version = 1")

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    conn.execute(
        "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
        " registered_unix_ms, applied_version, metrics, revoked) VALUES"
        " ('live', ?, 'north', 'f', '1', '{\"memory_bytes\": 8}', 5, 'v3', '{\"acc\": 0.5}', 0),"
        " ('gone', ?, '', 'f', '1', '{}', 6, '', '{}', 1)",
        (sha("live-token"), sha("gone-token")),
    )
    conn.execute(
        "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
        " registered_unix_ms, enrollment_sha256) VALUES ('new', 'x', 'south', '', '', '{}', 7, ?)",
        (sha("one-time"),),
    )
    conn.execute("INSERT INTO rollbacks (device_id, from_version, to_version, reason, unix_ms) VALUES"
                 " ('live', 'v3', 'v2', 'guard', 8)")  # fmt: skip
    conn.close()
    reg = DeviceRegistry(path)
    try:
        live = reg.authenticate("live-token")
        assert (live.device_id, live.cohort, live.capabilities, live.metrics) == ("live", "north", {"memory_bytes": 8},
                                                                                 {"acc": 0.5})  # fmt: skip
        assert reg.authenticate("gone-token") is None and reg.get("gone").state == "revoked"
        assert reg.get("new").state == "provisioned" and reg.check_enrollment_code("new", "one-time")
        assert [(e.device_id, e.to_version) for e in reg.rollbacks()] == [("live", "v2")]
        reg.record_rollback("live", "v2", "v1", "again")
        assert [e.event_id for e in reg.rollbacks()] == [1, 2]
    finally:
        reg.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()


def test_an_updates_file_made_by_the_code_before_the_sql_layer_migrates_in_place(tmp_path):
    """updates.db at main's step 1 with an update a job published: its payload is served, the job id is found by
    the indexed lookup, and the next update numbers after it."""
    from cloud.updates import SqliteUpdateRegistry
    from cloud.updates.registry import SQLITE_MIGRATIONS

    key = generate_private_key()
    old = tmp_path / "old"
    (old / "blobs").mkdir(parents=True)
    payload = b"weights of job 7"
    sha = hashlib.sha256(payload).hexdigest()
    (old / "blobs" / sha).write_bytes(payload)
    conn = sqlite3.connect(old / "updates.db", isolation_level=None)
    conn.executescript(SQLITE_MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO updates (device_id, cohort, base_version, target_version, sha256, size, metadata,"
        " created_unix_ms, signature, key_id, payload_info)"
        " VALUES ('dev-1', '', 'v0', 'v1', ?, ?, ?, 1, x'00', 'k', x'')",
        (sha, len(payload), '{"job_id": "7"}'),
    )
    conn.close()
    reg = SqliteUpdateRegistry(old, key)
    try:
        (record,) = reg.list(device_id="dev-1")
        assert reg.read_payload(record.update_id, 0, record.size) == payload
        assert reg.by_job(7) == record and reg.by_job(8) is None
        assert reg.publish("dev-1", "v1", "v2", b"next").update_id == record.update_id + 1
    finally:
        reg.close()
    conn = sqlite3.connect(old / "updates.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(SQLITE_MIGRATIONS) == 3
    conn.close()


def test_a_jobs_file_made_by_the_code_before_the_sql_layer_migrates_in_place(tmp_path):
    """jobs.db as main's code made it (an unversioned script; tables ``cursors`` and ``meta``): its jobs, cursors
    and metadata are adopted under PostgreSQL's table names, and the one-active-job rule still holds."""
    from cloud.adaptation.job_store import SQLITE_MIGRATIONS, SqliteJobStore
    from cloud.adaptation.jobs import NewJob, SeqRange

    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SQLITE_MIGRATIONS[0])  # main's script, user_version 0
    conn.execute(
        "INSERT INTO jobs (subject_kind, subject, family, ranges, samples, bytes, reason, state, created_unix_ms)"
        " VALUES ('device', 'dev-1', 'f', '[[\"dev-1\", 0, 9]]', 9, 90, 'r', 'queued', 1)"
    )
    conn.execute("INSERT INTO cursors VALUES ('dev-1', 9, 1)")
    conn.execute("INSERT INTO meta VALUES ('rollback_cursor', '4')")
    conn.close()
    store = SqliteJobStore(path)
    try:
        (job,) = store.list()
        assert (job.subject, job.state, job.ranges) == ("dev-1", "queued", (SeqRange("dev-1", 0, 9),))
        assert store.cursor("dev-1") == (9, 1) and store.get_meta("rollback_cursor") == "4"
        assert store.create(NewJob("device", "dev-1", "f", (SeqRange("dev-1", 9, 12),), 3, 30, "r")) is None
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "job_cursors", "job_meta"} <= tables and not {"cursors", "meta"} & tables
    conn.close()
