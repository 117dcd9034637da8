"""The cloud's SQL layer on SQLAlchemy Core: one ``MetaData`` naming the tables the stores query on both
databases, the engines for SQLite and PostgreSQL, and the hooks where the two really differ.

Hooks: SQLite opens every write transaction (:func:`write`) with ``BEGIN IMMEDIATE`` (the writer lock at once, so a
read-then-write transaction never fails to upgrade; WAL, ``synchronous`` and a busy timeout on every
connection); PostgreSQL serialises id-ordered inserts with a transaction-scoped advisory lock
(:func:`xact_lock`; SQLite needs none, its writer lock already orders them) and wakes other processes with
``NOTIFY`` (:func:`notify`; ``cloud.listen`` LISTENs); upserts use each dialect's ``insert``
(:func:`upsert`). The schema itself is created and changed by the steps in ``cloud.schemas`` only
(``cloud.migrations`` applies them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

metadata = MetaData()
_Json = JSON().with_variant(postgresql.JSONB(), "postgresql")
_Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite's rowid alias must be INTEGER

samples = Table(
    "samples",
    metadata,
    Column("device_id", Text, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("blob_key", Text, nullable=False),
    Column("blob_offset", BigInteger, nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("metadata", _Json, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("received_unix_ms", BigInteger, nullable=False),
)
"""One row per stored sample; its payload is ``length`` bytes at ``blob_offset`` of payload ``blob_key``."""

devices = Table(
    "devices",
    metadata,
    Column("device_id", Text, primary_key=True),
    Column("token_sha256", Text, nullable=False, unique=True),
    Column("cohort", Text, nullable=False),
    Column("model_family", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("capabilities", _Json, nullable=False),
    Column("registered_unix_ms", BigInteger, nullable=False),
    Column("applied_version", Text, nullable=False, server_default=""),
    Column("status", Text, nullable=False, server_default=""),
    Column("metrics", _Json, nullable=False, server_default="{}"),
    Column("last_seen_unix_ms", BigInteger, nullable=False, server_default="0"),
    Column("revoked", Boolean(create_constraint=False), nullable=False, server_default="0"),
    Column("enrollment_sha256", Text),
)

device_epoch = Table(
    "device_epoch",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("epoch", BigInteger, nullable=False),
)
"""One row: bumped by every change to who holds which token (token caches compare it, ``cloud.device_tokens``)."""

rollbacks = Table(
    "rollbacks",
    metadata,
    Column("event_id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", Text, nullable=False),
    Column("from_version", Text, nullable=False),
    Column("to_version", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("unix_ms", BigInteger, nullable=False),
)


updates = Table(
    "updates",
    metadata,
    Column("update_id", _Id, primary_key=True, autoincrement=True),
    Column("device_id", Text, nullable=False),
    Column("cohort", Text, nullable=False),
    Column("base_version", Text, nullable=False),
    Column("target_version", Text, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("metadata", _Json, nullable=False),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("payload_info", LargeBinary, nullable=False),
    Column("blob_key", Text, nullable=False),
    Column("job_id", BigInteger, nullable=False, server_default="0"),
)


jobs = Table(
    "jobs",
    metadata,
    Column("job_id", _Id, primary_key=True, autoincrement=True),
    Column("subject_kind", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("family", Text, nullable=False),
    Column("ranges", _Json, nullable=False),
    Column("samples", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=False, server_default=""),
    Column("outcome", Text, nullable=False, server_default=""),
    Column("update_id", BigInteger, nullable=False, server_default="0"),
    Column("result", _Json, nullable=False, server_default="{}"),
    Column("created_unix_ms", BigInteger, nullable=False),
    Column("started_unix_ms", BigInteger, nullable=False, server_default="0"),
    Column("finished_unix_ms", BigInteger, nullable=False, server_default="0"),
)

job_cursors = Table(
    "job_cursors",
    metadata,
    Column("device_id", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("unix_ms", BigInteger, nullable=False),
)

job_meta = Table("job_meta", metadata, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))


def sqlite_engine(path: str | Path, synchronous: str = "FULL") -> Engine:
    """An engine on a WAL-mode SQLite file whose write transactions (:func:`write`) begin with ``BEGIN IMMEDIATE``."""
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("synchronous must be FULL or NORMAL")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite+pysqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # the driver opens no transaction of its own: _begin does
        for pragma in ("journal_mode=WAL", f"synchronous={synchronous}", "busy_timeout=30000"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writes take the writer lock at once. Reads open no transaction: each statement reads its own WAL snapshot
        # (the stores' reads are single statements), which spares a BEGIN and a ROLLBACK per read.
        if conn.get_execution_options().get("write"):
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]

    return engine


def postgres_engine(dsn: str, application_name: str = "tandem", pool_size: int = 4) -> Engine:
    """An engine on PostgreSQL (psycopg 3); ConfigError at once if the server cannot be reached.

    Reads run in autocommit: one statement is one round trip (not BEGIN, the statement, ROLLBACK); :func:`write`
    opens a READ COMMITTED transaction (the isolation level is set on the client, no round trip).
    """
    from cloud.db import connect_postgres

    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: connect_postgres(dsn, application_name, autocommit=False),
        isolation_level="AUTOCOMMIT",
        pool_size=pool_size,  # no pre-ping (a round trip per checkout): a dropped connection fails its one
    )  # statement, SQLAlchemy discards it and the next checkout connects afresh
    with engine.connect():
        pass
    return engine


_SQLITE_WRITERS: dict[str, threading.RLock] = {}
_SQLITE_WRITERS_LOCK = threading.Lock()


def _sqlite_writer(engine: Engine) -> threading.RLock:
    with _SQLITE_WRITERS_LOCK:
        return _SQLITE_WRITERS.setdefault(str(engine.url.database), threading.RLock())


@contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """``with write(engine) as conn:`` one write transaction (SQLite: ``BEGIN IMMEDIATE``); reads use
    ``engine.connect()`` and lock nothing (on SQLite each read statement is its own snapshot).

    On SQLite the threads of one process take turns on a lock per file before ``BEGIN IMMEDIATE``: waiting for the
    writer lock inside SQLite means its busy handler, which sleeps and polls (up to 100 ms a turn), so a burst of
    concurrent writes (a wave of registrations) would wait far longer than the writes take.
    """
    if engine.dialect.name != "sqlite":
        with engine.execution_options(write=True, isolation_level="READ COMMITTED").begin() as conn:
            yield conn
        return
    with _sqlite_writer(engine), engine.execution_options(write=True).begin() as conn:
        yield conn


def xact_lock(conn: Connection, key: int) -> None:
    """PostgreSQL: hold advisory lock ``key`` until the transaction ends (no-op on SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(key)))


def notify(conn: Connection, channel: str, payload: str) -> None:
    """PostgreSQL: ``NOTIFY channel`` when the transaction commits (no-op on SQLite: one process serves it)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(channel, payload)))


def upsert(conn: Connection, table: Table):
    """The dialect's ``INSERT`` with ``on_conflict_do_*``."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
