"""Connections to the shared PostgreSQL database (psycopg 3): the engines' creator and the LISTEN threads use it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    import psycopg


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
