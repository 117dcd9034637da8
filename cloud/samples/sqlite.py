"""SQLite (WAL) sample store: metadata rows in SQLite, payload bytes appended to segment files.

Payloads are appended to ``<db stem>.segments/<n>.seg`` and made durable (fsync with ``synchronous=FULL``)
before the transaction that inserts their rows commits, so a committed row always points at durable bytes.
A crash between the two leaves unreferenced bytes in a segment (the sample was never acked; the device
resends it). Writing each payload once, sequentially, is several times faster than SQLite overflow pages
plus WAL checkpoint copies.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from cloud.db import open_sqlite
from cloud.migrations import migrate_sqlite
from cloud.samples.base import Committed, PendingStats, Sample, SampleStore

_MIGRATIONS = (
    """
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
""",
)
SEGMENT_BYTES = 256 * 1024 * 1024


class SqliteSampleStore(SampleStore):
    """Samples keyed by (device_id, seq); a key that exists is skipped, which makes writes idempotent."""

    def __init__(self, path: str | Path, synchronous: str = "FULL", segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._conn = open_sqlite(self.path, synchronous)
        try:
            migrate_sqlite(self._conn, _MIGRATIONS, f"sample store {self.path}")
        except BaseException:
            self._conn.close()
            raise
        self.segment_dir = self.path.parent / f"{self.path.stem}.segments"
        self.segment_dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        existing = sorted(int(p.stem) for p in self.segment_dir.glob("*.seg"))
        self._segment = existing[-1] if existing else 0
        self._writer = open(self._segment_path(self._segment), "ab")  # noqa: SIM115 (kept open, closed in close())
        self._readers: dict[int, int] = {}

    def _segment_path(self, n: int) -> Path:
        return self.segment_dir / f"{n:06d}.seg"

    def _rotate_if_full(self) -> None:
        if self._writer.tell() >= self.segment_bytes:
            self._writer.close()
            self._segment += 1
            self._writer = open(self._segment_path(self._segment), "ab")  # noqa: SIM115

    def commit(self, samples: Sequence[Sample]) -> Committed:
        if not samples:
            return Committed([], {})
        with self._lock:
            new = self._put(samples)
            ids = sorted({s.device_id for s in samples})
            rows = self._conn.execute(
                f"SELECT device_id, MAX(seq) FROM samples WHERE device_id IN ({','.join('?' * len(ids))})"
                " GROUP BY device_id",
                ids,
            ).fetchall()
        return Committed(new, {d: int(q) for d, q in rows})

    def _put(self, samples: Sequence[Sample]) -> list[bool]:
        """Write payloads, then insert their rows in one transaction (the caller holds the lock)."""
        cur = self._conn.cursor()
        results: list[bool] = []
        seen: set[tuple[str, int]] = set()
        rows = []
        self._rotate_if_full()
        for s in samples:
            key = (s.device_id, s.seq)
            exists = key in seen or cur.execute("SELECT 1 FROM samples WHERE device_id = ? AND seq = ?", key).fetchone()
            results.append(not exists)
            if exists:
                continue
            seen.add(key)
            offset = self._writer.tell()
            self._writer.write(s.payload)
            rows.append(
                (
                    s.device_id,
                    s.seq,
                    self._segment,
                    offset,
                    len(s.payload),
                    json.dumps(s.metadata, sort_keys=True),
                    s.created_unix_ms,
                    s.received_unix_ms,
                )
            )
        if not rows:
            return results
        self._writer.flush()
        if self.synchronous == "FULL":
            os.fsync(self._writer.fileno())
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return results

    def pending_stats(self, device_id: str, after_seq: int, limit: int) -> PendingStats:
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length), 0), COALESCE(MAX(seq), 0) FROM (SELECT seq, length"
                " FROM samples WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?)",
                (device_id, after_seq, limit),
            ).fetchone()
        return PendingStats(int(row[0]), int(row[1]), int(row[2]))

    def high_water(self, device_id: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(seq) FROM samples WHERE device_id = ?", (device_id,)).fetchone()
        return int(row[0] or 0)

    def high_waters(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT device_id, MAX(seq) FROM samples GROUP BY device_id").fetchall()
        return {str(d): int(seq) for d, seq in rows}

    def _read(self, segment: int, offset: int, length: int) -> bytes:
        fd = self._readers.get(segment)
        if fd is None:
            fd = os.open(self._segment_path(segment), os.O_RDONLY)
            self._readers[segment] = fd
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"segment {segment} is shorter than its index says (offset {offset}, length {length})")
        return data

    def iter_samples(self, device_id: str, after_seq: int = 0, limit: int | None = None) -> Iterator[Sample]:
        page = 256
        remaining = limit
        cursor = after_seq
        while remaining is None or remaining > 0:
            n = page if remaining is None else min(page, remaining)
            with self._lock:
                rows = self._conn.execute(
                    "SELECT seq, segment, offset, length, metadata, created_unix_ms, received_unix_ms"
                    " FROM samples WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (device_id, cursor, n),
                ).fetchall()
                if not rows:
                    return
                payloads = [self._read(seg, off, ln) for _, seg, off, ln, *_ in rows]
            for (seq, _, _, _, meta, created, received), payload in zip(rows, payloads, strict=True):
                yield Sample(device_id, int(seq), payload, json.loads(meta), int(created), int(received))
            cursor = int(rows[-1][0])
            if remaining is not None:
                remaining -= len(rows)

    def count(self, device_id: str | None = None) -> int:
        with self._lock:
            if device_id is None:
                row = self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()
            else:
                row = self._conn.execute("SELECT COUNT(*) FROM samples WHERE device_id = ?", (device_id,)).fetchone()
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
            self._writer.close()
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()
            self._conn.close()
