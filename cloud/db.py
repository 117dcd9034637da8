"""SQLite connection helper for the cloud's stores (WAL mode, shared across threads behind a lock)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


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
