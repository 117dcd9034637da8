"""Versioned schema migrations, applied at start the same way on SQLite and PostgreSQL; a database newer than this
code is refused untouched.

Each store's schema (``cloud.schemas``: devices, samples, updates, jobs) is one ordered list of steps. A database
records the steps it holds in ``tandem_migrations`` (store, version): a SQLite file holds one store, the shared
PostgreSQL database all four. :func:`migrate` reads the versions first (a newer one raises SchemaError before
anything is written), then applies the missing steps in one write transaction (SQLite ``BEGIN IMMEDIATE``;
PostgreSQL under an advisory lock, so gateways and trainers starting together migrate once) and rolls all of
them back if one fails.

A step is SQL with type markers (``<ID>``, ``<BIGINT>``, ``<JSON>``, ``<BYTES>``, ``<BOOL>``, ``<FALSE>``,
``<WITHOUT_ROWID>``) that render each dialect's DDL, SQL per dialect where the databases really differ, or a
function of the connection (a step that depends on what an old file holds).

Databases from before this list (SQLite: ``PRAGMA user_version`` per file; PostgreSQL: one global list in
``tandem_schema_migrations``) are adopted at the version their old number maps to (``Schema.legacy``). Both old
markers are then set to ``LEGACY_MARK``, which older Tandem reads as "newer than this code" and refuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text

from cloud import sql
from common.errors import TandemError

MIGRATIONS_TABLE = "tandem_migrations"
LEGACY_TABLE = "tandem_schema_migrations"  # PostgreSQL's one list before per-store lists
LEGACY_MARK = 1000  # the old version number left for older code: above anything it knows, so it refuses
_LOCK_ID = 0x74616E64656D  # "tandem": the advisory lock that serialises migrations (PostgreSQL)

_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"<ID>": "INTEGER PRIMARY KEY AUTOINCREMENT", "<BIGINT>": "INTEGER", "<JSON>": "TEXT",
               "<BYTES>": "BLOB", "<BOOL>": "INTEGER", "<FALSE>": "0", "<WITHOUT_ROWID>": "WITHOUT ROWID"},
    "postgresql": {"<ID>": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "<BIGINT>": "BIGINT",
                   "<JSON>": "JSONB", "<BYTES>": "BYTEA", "<BOOL>": "BOOLEAN", "<FALSE>": "FALSE",
                   "<WITHOUT_ROWID>": ""},
}  # fmt: skip

Step = str | Mapping[str, str] | Callable[[Connection], None]


class SchemaError(TandemError):
    """The database's schema is newer than this code (or a migration failed); nothing was written."""


@dataclass(frozen=True)
class Migration:
    """One schema step: ``version`` n turns schema n-1 into n."""

    version: int
    description: str
    step: Step


@dataclass(frozen=True)
class Schema:
    """One store's ordered steps, and how a database from before the list maps onto it."""

    name: str
    migrations: tuple[Migration, ...]
    legacy: Callable[[str, int], int | None]
    """(dialect, old version number) -> the version of this list such a database holds; None if unknown."""

    @property
    def latest(self) -> int:
        """The newest version this code knows."""
        return self.migrations[-1].version if self.migrations else 0


def render(statements: str, dialect: str) -> list[str]:
    """``statements`` (separated by ``;``) with the type markers of ``dialect``."""
    for marker, ddl in _TYPES[dialect].items():
        statements = statements.replace(marker, ddl)
    return [s.strip() for s in statements.split(";") if s.strip()]


def add_column(conn: Connection, table: str, column: str, ddl: str) -> None:
    """``ALTER TABLE table ADD COLUMN column ddl`` unless the table has the column (a step that an old file may
    already hold)."""
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")


def _run(conn: Connection, step: Step) -> None:
    dialect = conn.dialect.name
    if callable(step):
        step(conn)
        return
    for statement in render(step if isinstance(step, str) else step[dialect], dialect):
        conn.exec_driver_sql(statement)


def _legacy_version(conn: Connection, tables: set[str]) -> int:
    if conn.dialect.name == "sqlite":
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
    if LEGACY_TABLE not in tables:
        return 0
    return int(conn.exec_driver_sql(f"SELECT COALESCE(MAX(version), 0) FROM {LEGACY_TABLE}").scalar() or 0)


def versions(conn: Connection, schemas: tuple[Schema, ...], where: str) -> dict[str, int]:
    """The version of each schema the database holds (reads only); SchemaError if one is newer than this code."""
    tables = set(inspect(conn).get_table_names())
    found: dict[str, int] = {}
    if MIGRATIONS_TABLE in tables:
        rows = conn.execute(text(f"SELECT store, MAX(version) FROM {MIGRATIONS_TABLE} GROUP BY store")).all()
        found = {store: int(v) for store, v in rows}
        current = {s.name: found.get(s.name, 0) for s in schemas}
    else:
        old = _legacy_version(conn, tables)
        current = {}
        for s in schemas:
            adopted = s.legacy(conn.dialect.name, old) if old else 0
            if adopted is None:
                raise _too_new(f"{where} ({s.name})", old, "an older layout")
            current[s.name] = adopted
    for s in schemas:
        if current[s.name] > s.latest:
            raise _too_new(f"{where} ({s.name})", current[s.name], str(s.latest))
    return current


def _too_new(where: str, found: int, known: str) -> SchemaError:
    return SchemaError(
        f"{where} has schema version {found}, newer than this code knows ({known}); upgrade Tandem (nothing was "
        "written)"
    )


def migrate(engine: Engine, *schemas: Schema, where: str = "") -> dict[str, int]:
    """Bring ``schemas`` to their newest versions in the database of ``engine``; returns them.

    SchemaError (and nothing written) if the database holds a newer version of one of them, or if a step fails.
    """
    where = where or f"database {engine.url.render_as_string(hide_password=True)}"
    with engine.connect() as conn:  # refuse a newer schema before writing anything, even the version table
        current = versions(conn, schemas, where)
    if all(current[s.name] == s.latest for s in schemas):
        return current
    with sql.write(engine) as conn:
        sql.xact_lock(conn, _LOCK_ID)
        current = versions(conn, schemas, where)  # another process may have migrated while we waited
        conn.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (store TEXT NOT NULL, version INTEGER NOT NULL,"
            " description TEXT NOT NULL, applied_unix_ms BIGINT NOT NULL, PRIMARY KEY (store, version))"
        )
        recorded = {r[0] for r in conn.execute(text(f"SELECT DISTINCT store FROM {MIGRATIONS_TABLE}"))}
        for s in schemas:
            if current[s.name] and s.name not in recorded:  # adopted from the layout before this list
                _record(conn, s.name, current[s.name], "adopted: the steps up to here, recorded the old way")
            for m in s.migrations:
                if m.version <= current[s.name]:
                    continue
                try:
                    _run(conn, m.step)
                except Exception as exc:
                    raise SchemaError(
                        f"{where}: migration {s.name} {m.version} ({m.description}) failed: {exc}"
                    ) from exc
                _record(conn, s.name, m.version, m.description)
            current[s.name] = s.latest
        _mark_for_older_code(conn)
    return current


def migrated_sqlite(path: str | Path, synchronous: str, schema: Schema, what: str) -> Engine:
    """An engine on the SQLite file ``path`` holding one store (``what``, for messages), its schema migrated."""
    engine = sql.sqlite_engine(path, synchronous)
    try:
        migrate(engine, schema, where=f"{what} {path}")
    except BaseException:
        engine.dispose()
        raise
    return engine


def _record(conn: Connection, store: str, version: int, description: str) -> None:
    conn.execute(
        text(f"INSERT INTO {MIGRATIONS_TABLE} VALUES (:s, :v, :d, :t)"),
        {"s": store, "v": version, "d": description, "t": int(time.time() * 1000)},
    )


def _mark_for_older_code(conn: Connection) -> None:
    """Leave the old version markers at ``LEGACY_MARK``: older Tandem refuses the database instead of re-running
    its own steps on it."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"PRAGMA user_version = {LEGACY_MARK}")
        return
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {LEGACY_TABLE} (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
        " applied_unix_ms BIGINT NOT NULL)"
    )
    conn.exec_driver_sql(
        f"INSERT INTO {LEGACY_TABLE} VALUES ({LEGACY_MARK}, 'per-store versions in {MIGRATIONS_TABLE}', 0)"
        " ON CONFLICT (version) DO NOTHING"
    )
