"""Versioned schema migrations: one ordered list per store, applied the same way on SQLite and PostgreSQL, at
start, once, by whichever process comes first; a database whose schema is newer than the code is refused with a
clear error and left exactly as it was; databases made by the code before the one list migrate in place."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import threading

import pytest
from legacy_schemas import POSTGRES_GLOBAL, SQLITE_DEVICES_V1, SQLITE_JOBS, SQLITE_SAMPLES_V1, SQLITE_UPDATES
from store_support import make_backend, pg_dsn  # noqa: F401 (fixture)
from transport_support import REPO_ROOT

from cloud import sql
from cloud.db import connect_postgres
from cloud.devices import DeviceRegistry
from cloud.migrations import LEGACY_MARK, LEGACY_TABLE, MIGRATIONS_TABLE, Migration, Schema, SchemaError, migrate
from cloud.samples import Sample, SqliteSampleStore
from cloud.schemas import ALL
from cloud.stores import open_stores
from common.signing import generate_private_key

LATEST = {s.name: s.latest for s in ALL}


@pytest.fixture
def dsn(request):
    """A fresh database on the session's PostgreSQL."""
    return request.getfixturevalue("pg_dsn")


def _engine(name: str, tmp_path, request):
    if name == "sqlite":
        return sql.sqlite_engine(tmp_path / "test.db")
    return sql.postgres_engine(request.getfixturevalue("pg_dsn"))


def _catalog(dsn: str) -> list[tuple]:
    """Every table with its row count, and the recorded versions: what a write would change."""
    with connect_postgres(dsn) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        counts = [(t, conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in tables]
        versions = conn.execute(f"SELECT store, version FROM {MIGRATIONS_TABLE} ORDER BY 1, 2").fetchall()
    return counts + versions


def _recorded(conn) -> dict[str, int]:
    rows = conn.exec_driver_sql(f"SELECT store, MAX(version) FROM {MIGRATIONS_TABLE} GROUP BY store").all()
    return {store: int(v) for store, v in rows}


def test_postgres_migrates_a_fresh_database_once_and_marks_it_for_older_code(dsn):
    engine = sql.postgres_engine(dsn)
    try:
        assert migrate(engine, *ALL) == LATEST
        assert migrate(engine, *ALL) == LATEST  # already current: nothing to do
        with engine.connect() as conn:
            assert _recorded(conn) == LATEST
            tables = set(conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").scalars())
            old = conn.exec_driver_sql(f"SELECT MAX(version) FROM {LEGACY_TABLE}").scalar()
    finally:
        engine.dispose()
    assert {"samples", "devices", "device_epoch", "updates", "jobs", "job_cursors", "job_meta"} <= tables
    assert old == LEGACY_MARK  # the code before per-store lists reads "newer than this code" and refuses


def test_postgres_processes_starting_together_migrate_once(dsn):
    errors: list[BaseException] = []

    def start() -> None:
        engine = sql.postgres_engine(dsn, application_name="racer")
        try:
            migrate(engine, *ALL)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with connect_postgres(dsn) as conn:
        rows = conn.execute(f"SELECT store, version FROM {MIGRATIONS_TABLE}").fetchall()
    assert sorted(rows) == sorted((s.name, m.version) for s in ALL for m in s.migrations)


@pytest.mark.parametrize("name", ["sqlite", "postgres"])
def test_only_missing_steps_run_and_a_failed_step_changes_nothing(name, tmp_path, request):
    def schema(*steps: Migration) -> Schema:
        return Schema("t", steps, lambda dialect, old: None)

    one = (Migration(1, "a", "CREATE TABLE a (x <BIGINT>)"),)
    two = (*one, Migration(2, "b", "CREATE TABLE b (y <JSON>); INSERT INTO a VALUES (1)"))
    broken = (*two, Migration(3, "c", "CREATE TABLE c (z INT); SELECT no_such_function()"))
    engine = _engine(name, tmp_path, request)
    try:
        assert migrate(engine, schema(*one)) == {"t": 1}
        assert migrate(engine, schema(*two)) == {"t": 2}  # only step 2 runs: a second CREATE TABLE a would fail
        with pytest.raises(SchemaError, match="migration t 3 \\(c\\) failed"):
            migrate(engine, schema(*broken))
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM a").scalar() == 1
            assert _recorded(conn) == {"t": 2}
            from sqlalchemy import inspect

            assert "c" not in inspect(conn).get_table_names()  # rolled back with its step
    finally:
        engine.dispose()


def _sqlite_files(backend) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(backend.data_dir().rglob("*.db"))}


def _make_newer(backend) -> None:
    """State written by a future Tandem: the samples schema at version 99."""
    newer = f"INSERT INTO {MIGRATIONS_TABLE} VALUES ('samples', 99, 'from the future', 0)"
    if backend.name == "sqlite":
        conn = sqlite3.connect(backend.data_dir() / "samples.db", isolation_level=None)
        conn.execute(newer)
        conn.close()
        return
    with connect_postgres(backend.store_fields["postgres_dsn"]) as conn:
        conn.execute(newer)


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


def _user_version(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _store_versions(path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(f"SELECT store, MAX(version) FROM {MIGRATIONS_TABLE} GROUP BY store").fetchall()
    finally:
        conn.close()
    return dict(rows)


def test_a_samples_file_made_by_the_code_before_the_one_store_migrates_in_place(tmp_path):
    """samples.db with rows naming (segment, offset) and its segment files: every payload reads back byte for
    byte through the one store, resends stay duplicates, and new samples append to the same segments."""
    path = tmp_path / "samples.db"
    segments = tmp_path / "samples.segments"
    segments.mkdir()
    payloads = {seq: bytes([seq]) * (1000 + seq) for seq in range(1, 6)}
    rows, offset = [], 0
    with open(segments / "000000.seg", "wb") as f:
        for seq, data in payloads.items():
            f.write(data)
            rows.append(("dev-1", seq, 0, offset, len(data), json.dumps({"k": str(seq)}), seq, 10 + seq))
            offset += len(data)
    (segments / "000001.seg").write_bytes(b"x" * 7 + b"late")
    rows.append(("dev-2", 1, 1, 7, 4, "{}", 1, 2))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SQLITE_SAMPLES_V1)
    conn.execute("PRAGMA user_version = 1")
    conn.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    store = SqliteSampleStore(path)
    try:
        got = list(store.iter_samples("dev-1"))
        assert [(s.seq, s.payload, s.metadata, s.created_unix_ms) for s in got] == [
            (seq, data, {"k": str(seq)}, seq) for seq, data in payloads.items()
        ]
        assert [s.payload for s in store.iter_samples("dev-2")] == [b"late"]
        assert store.put([Sample("dev-1", 5, b"resent"), Sample("dev-1", 6, b"new")]) == [False, True]
        assert store.high_water("dev-1") == 6 and store.count() == 7 and store.devices() == ["dev-1", "dev-2"]
        assert [s.payload for s in store.iter_samples("dev-1", after_seq=4)] == [payloads[5], b"new"]
    finally:
        store.close()
    assert sorted(p.name for p in segments.iterdir()) == ["000000.seg", "000001.seg"]
    assert _store_versions(path) == {"samples": LATEST["samples"]} and _user_version(path) == LEGACY_MARK


def _old_postgres(dsn: str, blob_dir) -> None:
    """The shared database as the code before per-store lists left it: global versions 1-4, one row of each kind."""
    from cloud.blobs import DirectoryBlobStore

    blobs = DirectoryBlobStore(blob_dir)
    blobs.put("samples/2026/batch", b"aaaabbbbbb")
    blobs.put("updates/" + hashlib.sha256(b"weights").hexdigest(), b"weights")
    with connect_postgres(dsn) as conn, conn.transaction():
        conn.execute(
            f"CREATE TABLE {LEGACY_TABLE} (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
            " applied_unix_ms BIGINT NOT NULL)"
        )
        for m in POSTGRES_GLOBAL:
            conn.execute(m.sql.encode())
            conn.execute(f"INSERT INTO {LEGACY_TABLE} VALUES (%s, %s, 0)", (m.version, m.description))
        conn.execute(
            "INSERT INTO samples VALUES ('dev-1', 1, 'samples/2026/batch', 0, 4, '{}', 1, 1),"
            " ('dev-1', 2, 'samples/2026/batch', 4, 6, '{\"k\": \"v\"}', 2, 2)"
        )
        conn.execute(
            "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
            " registered_unix_ms) VALUES ('dev-1', %s, 'north', 'f', '1', '{}', 1)",
            (hashlib.sha256(b"old-token").hexdigest(),),
        )
        sha = hashlib.sha256(b"weights").hexdigest()
        conn.execute(
            "INSERT INTO updates (device_id, cohort, base_version, target_version, sha256, size, metadata,"
            " created_unix_ms, signature, key_id, payload_info, blob_key, job_id)"
            " VALUES ('dev-1', '', 'v0', 'v1', %s, 7, '{\"job_id\": \"3\"}', 1, '\\x00', 'k', '', %s, 3)",
            (sha, "updates/" + sha),
        )
        conn.execute(
            "INSERT INTO jobs (subject_kind, subject, family, ranges, samples, bytes, reason, state,"
            " created_unix_ms) VALUES ('device', 'dev-1', 'f', '[]', 2, 10, 'r', 'done', 1)"
        )
        conn.execute("INSERT INTO job_cursors VALUES ('dev-1', 2, 1)")


def test_a_postgres_database_made_by_the_code_before_the_one_list_migrates_in_place(tmp_path, request):
    from cloud.config import GatewayConfig
    from cloud.stores import open_job_store

    backend = make_backend("postgres-dir", tmp_path / "state", request)
    dsn = backend.store_fields["postgres_dsn"]
    _old_postgres(dsn, backend.store_fields["blobs"]["directory"])
    cfg = GatewayConfig(**backend.fields())
    stores = open_stores(cfg, cfg.data_dir, generate_private_key())
    jobs = open_job_store(cfg, tmp_path / "trainer")
    try:
        assert [(s.seq, s.payload, s.metadata) for s in stores.samples.iter_samples("dev-1")] == [
            (1, b"aaaa", {}), (2, b"bbbbbb", {"k": "v"})
        ]  # fmt: skip
        assert stores.devices.authenticate("old-token").cohort == "north"
        assert stores.devices.revoke("dev-1") and stores.devices.authenticate("old-token") is None
        (update,) = stores.updates.list(device_id="dev-1")
        assert stores.updates.read_payload(update.update_id, 0, 7) == b"weights"
        assert stores.updates.by_job(3) == update
        assert jobs.cursor("dev-1") == (2, 1) and jobs.counts()["done"] == 1
    finally:
        jobs.close()
        stores.close()
    with connect_postgres(dsn) as conn:
        found = dict(conn.execute(f"SELECT store, MAX(version) FROM {MIGRATIONS_TABLE} GROUP BY store").fetchall())
        assert found == LATEST
        assert conn.execute(f"SELECT MAX(version) FROM {LEGACY_TABLE}").fetchone()[0] == LEGACY_MARK


def test_sqlite_file_from_before_versioning_is_adopted_with_its_rows(tmp_path):
    path = tmp_path / "devices.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SQLITE_DEVICES_V1)  # what the code before migrations created (user_version 0)
    conn.execute(
        "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
        " registered_unix_ms) VALUES ('old', 'h', '', 'f', 'v', '{}', 1)"
    )
    conn.close()
    reg = DeviceRegistry(path)
    assert [d.device_id for d in reg.list()] == ["old"]
    reg.close()
    assert _store_versions(path) == {"devices": LATEST["devices"]} and _user_version(path) == LEGACY_MARK


def test_a_devices_file_made_by_the_code_before_the_sql_layer_migrates_in_place(tmp_path):
    """devices.db as main's code left it (schema step 1, then an unversioned ALTER for enrollment codes): the
    versioned step 2 adopts it with every row, token and code intact."""
    path = tmp_path / "devices.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SQLITE_DEVICES_V1)
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
    assert _store_versions(path) == {"devices": LATEST["devices"]}


def test_an_updates_file_made_by_the_code_before_the_sql_layer_migrates_in_place(tmp_path):
    """updates.db at main's step 1 with an update a job published: its payload is served, the job id is found by
    the indexed lookup, and the next update numbers after it."""
    from cloud.updates import SqliteUpdateRegistry

    key = generate_private_key()
    old = tmp_path / "old"
    (old / "blobs").mkdir(parents=True)
    payload = b"weights of job 7"
    sha = hashlib.sha256(payload).hexdigest()
    (old / "blobs" / sha).write_bytes(payload)
    conn = sqlite3.connect(old / "updates.db", isolation_level=None)
    conn.executescript(SQLITE_UPDATES[0])
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
    assert _store_versions(old / "updates.db") == {"updates": LATEST["updates"]} == {"updates": 3}


def test_a_jobs_file_made_by_the_code_before_the_sql_layer_migrates_in_place(tmp_path):
    """jobs.db as main's code made it (an unversioned script; tables ``cursors`` and ``meta``): its jobs, cursors
    and metadata are adopted under PostgreSQL's table names, and the one-active-job rule still holds."""
    from cloud.adaptation.job_store import SqliteJobStore
    from cloud.adaptation.jobs import NewJob, SeqRange

    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SQLITE_JOBS[0])  # main's script, user_version 0
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
    assert _store_versions(path) == {"jobs": 2}
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "job_cursors", "job_meta"} <= tables and not {"cursors", "meta"} & tables
    conn.close()
