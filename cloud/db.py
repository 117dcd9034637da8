"""Database connections for the cloud's stores: embedded SQLite (WAL) and shared PostgreSQL (psycopg 3)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    import psycopg


def open_sqlite(path: str | Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open a WAL-mode SQLite database usable from several threads (callers serialise access)."""
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("synchronous must be FULL or NORMAL")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def connect_postgres(dsn: str, application_name: str = "tandem", autocommit: bool = True) -> psycopg.Connection:
    """A psycopg connection (autocommit: transactions are opened explicitly); ConfigError if unreachable."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid PostgreSQL DSN: {exc}") from None
    extra = {k: v for k, v in (("connect_timeout", 10), ("application_name", application_name)) if k not in params}
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **extra)
    except psycopg.OperationalError as exc:
        where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
        raise ConfigError(f"cannot connect to PostgreSQL at {where}: {str(exc).strip()}") from None


class PostgresDatabase:
    """One connection shared by a store's threads behind a lock, reopened after the server drops it.

    ``cursor()`` runs each statement as its own transaction (one round trip; a single INSERT of many rows is
    atomic and durable when it returns). ``transaction()`` groups statements in one transaction that commits
    when the block ends. An error rolls back and propagates (nothing is acknowledged); the next call
    reconnects if the connection broke.
    """

    def __init__(self, dsn: str, application_name: str = "tandem", migrate: bool = True) -> None:
        self._dsn = dsn
        self._name = application_name
        self._lock = threading.RLock()
        self._conn = connect_postgres(dsn, application_name)
        if migrate:
            from cloud.migrations import migrate_postgres

            migrate_postgres(self._conn)

    @property
    def dsn(self) -> str:
        """The DSN this database was opened with."""
        return self._dsn

    def _connection(self) -> psycopg.Connection:
        if self._conn.closed or self._conn.broken:
            self._conn.close()
            self._conn = connect_postgres(self._dsn, self._name)
        return self._conn

    @contextmanager
    def cursor(self) -> Iterator[psycopg.Cursor]:
        """A cursor in autocommit mode, serialised with the other users of this object."""
        with self._lock:
            conn = self._connection()
            with conn.cursor() as cur:
                yield cur

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor]:
        """A cursor in one transaction, serialised with the other users of this object."""
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                yield cur

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
