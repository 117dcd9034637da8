"""PostgreSQL sample store: rows in PostgreSQL, payload bytes in a shared blob store.

A ``put`` writes the payloads of its batch as one blob (one file or object per group commit, like the SQLite
store's segments), waits until the blob is durable, then inserts the rows with one
``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING`` (atomic and durable when it returns). A committed row
therefore always points at durable bytes, and two gateways that take the same sample at once (a device that
reconnected elsewhere) store it once: the primary key decides. Bytes nobody refers to (a resent sample, a
crash between blob and commit: never acked) stay in the blob unreferenced; a blob whose samples were all
stored before is deleted at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from cloud.blobs import BlobStore
from cloud.db import PostgresDatabase
from cloud.samples.base import Committed, PendingStats, Sample, SampleStore

_PAGE = 256
_MAX_GAP = 256 * 1024  # read across another device's bytes rather than issue a second request


class PostgresSampleStore(SampleStore):
    """Samples keyed by (device_id, seq) in a database shared by every gateway and the trainer.

    Writes and reads use separate connections, so a high-water lookup never waits behind a commit.
    """

    concurrent_reads = True

    def __init__(self, db: PostgresDatabase, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs
        self._reads = PostgresDatabase(db.dsn, "tandem-samples-read", migrate=False)

    def commit(self, samples: Sequence[Sample]) -> Committed:
        if not samples:
            return Committed([], {})
        fresh: dict[tuple[str, int], Sample] = {}
        for s in samples:
            fresh.setdefault((s.device_id, s.seq), s)  # a second copy in the same batch is a duplicate
        batch = list(fresh.values())
        blob_key = self.blobs.new_key("samples")
        offsets = []
        pos = 0
        for s in batch:
            offsets.append(pos)
            pos += len(s.payload)
        self.blobs.put(blob_key, b"".join(s.payload for s in batch))  # durable before any row refers to it
        ids = sorted({s.device_id for s in batch})
        with self.db.cursor() as cur:  # one statement: atomic, and durable once it returns
            # The rows it inserted, and each device's high-water before it (the statement's snapshot).
            cur.execute(
                "WITH ins AS (INSERT INTO samples (device_id, seq, blob_key, blob_offset, length, metadata,"
                " created_unix_ms, received_unix_ms) SELECT d, q, %s, o, n, m::jsonb, c, r FROM unnest(%s::text[],"
                " %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[])"
                " AS t(d, q, o, n, m, c, r) ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq)"
                " SELECT TRUE, device_id, seq FROM ins UNION ALL SELECT FALSE, device_id, MAX(seq) FROM samples"
                " WHERE device_id = ANY(%s::text[]) GROUP BY device_id",
                (
                    blob_key,
                    [s.device_id for s in batch],
                    [s.seq for s in batch],
                    offsets,
                    [len(s.payload) for s in batch],
                    [json.dumps(s.metadata, sort_keys=True) for s in batch],
                    [s.created_unix_ms for s in batch],
                    [s.received_unix_ms for s in batch],
                    ids,
                ),
            )
            rows = cur.fetchall()
        inserted = {(d, int(q)) for new, d, q in rows if new}
        high = dict.fromkeys(ids, 0)
        for _, d, q in rows:
            high[d] = max(high[d], int(q))
        if not inserted:  # every sample was stored before (a resend): nothing refers to the blob
            self.blobs.delete(blob_key)
        new = [s is fresh[(s.device_id, s.seq)] and (s.device_id, s.seq) in inserted for s in samples]
        return Committed(new, high)

    def pending_stats(self, device_id: str, after_seq: int, limit: int) -> PendingStats:
        with self._reads.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*), COALESCE(SUM(length), 0), COALESCE(MAX(seq), 0) FROM (SELECT seq, length"
                " FROM samples WHERE device_id = %s AND seq > %s ORDER BY seq LIMIT %s) AS page",
                (device_id, after_seq, limit),
            )
            row = cur.fetchone()
        return PendingStats(int(row[0]), int(row[1]), int(row[2])) if row else PendingStats(0, 0, 0)

    def high_water(self, device_id: str) -> int:
        with self._reads.cursor() as cur:
            cur.execute("SELECT MAX(seq) FROM samples WHERE device_id = %s", (device_id,))
            row = cur.fetchone()
        return int(row[0] or 0) if row else 0

    def high_waters(self) -> dict[str, int]:
        with self._reads.cursor() as cur:
            cur.execute("SELECT device_id, MAX(seq) FROM samples GROUP BY device_id")
            rows = cur.fetchall()
        return {str(d): int(seq) for d, seq in rows}

    def _payloads(self, rows: list[tuple]) -> list[bytes]:
        """Payloads of ``rows`` (blob_key, offset, length, ...): one ranged read per run of nearby bytes."""
        out: list[bytes] = []
        i = 0
        while i < len(rows):
            key, start, end = rows[i][0], rows[i][1], rows[i][1] + rows[i][2]
            j = i + 1
            while j < len(rows) and rows[j][0] == key and end <= rows[j][1] <= end + _MAX_GAP:
                end = rows[j][1] + rows[j][2]
                j += 1
            span = self.blobs.get(key, start, end - start)
            for _, off, length, *_ in rows[i:j]:
                data = span[off - start : off - start + length]
                if len(data) != length:
                    raise OSError(f"blob {key} is shorter than its rows say (offset {off}, length {length})")
                out.append(data)
            i = j
        return out

    def iter_samples(self, device_id: str, after_seq: int = 0, limit: int | None = None) -> Iterator[Sample]:
        remaining = limit
        cursor = after_seq
        while remaining is None or remaining > 0:
            n = _PAGE if remaining is None else min(_PAGE, remaining)
            with self._reads.cursor() as cur:
                cur.execute(
                    "SELECT blob_key, blob_offset, length, seq, metadata, created_unix_ms, received_unix_ms"
                    " FROM samples WHERE device_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                    (device_id, cursor, n),
                )
                rows = cur.fetchall()
            if not rows:
                return
            for row, payload in zip(rows, self._payloads(rows), strict=True):
                _, _, _, seq, meta, created, received = row
                yield Sample(device_id, int(seq), payload, dict(meta), int(created), int(received))
            cursor = int(rows[-1][3])
            if remaining is not None:
                remaining -= len(rows)

    def count(self, device_id: str | None = None) -> int:
        with self._reads.cursor() as cur:
            if device_id is None:
                cur.execute("SELECT COUNT(*) FROM samples")
            else:
                cur.execute("SELECT COUNT(*) FROM samples WHERE device_id = %s", (device_id,))
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def devices(self) -> list[str]:
        with self._reads.cursor() as cur:
            cur.execute("SELECT DISTINCT device_id FROM samples ORDER BY device_id")
            return [r[0] for r in cur.fetchall()]

    def close(self) -> None:
        self.db.close()
        self._reads.close()
        self.blobs.close()
