"""SQLite (WAL) implementation of the sample store."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from cloud.db import open_sqlite
from cloud.samples.base import Sample, SampleStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    payload BLOB NOT NULL,
    metadata TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
"""


class SqliteSampleStore(SampleStore):
    """Samples in one SQLite table keyed by (device_id, seq); ``INSERT OR IGNORE`` makes writes idempotent."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._conn = open_sqlite(self.path, synchronous)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)

    def put(self, samples: Sequence[Sample]) -> list[bool]:
        if not samples:
            return []
        results: list[bool] = []
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for s in samples:
                    cur.execute(
                        "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            s.device_id,
                            s.seq,
                            s.payload,
                            json.dumps(s.metadata, sort_keys=True),
                            s.created_unix_ms,
                            s.received_unix_ms,
                        ),
                    )
                    results.append(cur.rowcount == 1)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return results

    def high_water(self, device_id: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT MAX(seq) FROM samples WHERE device_id = ?", (device_id,)
            ).fetchone()
        return int(row[0] or 0)

    def iter_samples(self, device_id: str, after_seq: int = 0, limit: int | None = None) -> Iterator[Sample]:
        page = 256
        remaining = limit
        cursor = after_seq
        while remaining is None or remaining > 0:
            n = page if remaining is None else min(page, remaining)
            with self._lock:
                rows = self._conn.execute(
                    "SELECT seq, payload, metadata, created_unix_ms, received_unix_ms FROM samples "
                    "WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (device_id, cursor, n),
                ).fetchall()
            if not rows:
                return
            for seq, payload, meta, created, received in rows:
                yield Sample(
                    device_id, int(seq), bytes(payload), json.loads(meta), int(created), int(received)
                )
            cursor = int(rows[-1][0])
            if remaining is not None:
                remaining -= len(rows)

    def count(self, device_id: str | None = None) -> int:
        with self._lock:
            if device_id is None:
                row = self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()
            else:
                row = self._conn.execute(
                    "SELECT COUNT(*) FROM samples WHERE device_id = ?", (device_id,)
                ).fetchone()
        return int(row[0])

    def devices(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT device_id FROM samples ORDER BY device_id").fetchall()
        return [r[0] for r in rows]

    def journal_mode(self) -> str:
        """The SQLite journal mode in force (``wal``)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
