"""PostgreSQL sample store: rows in PostgreSQL, payload bytes in a shared blob store.

A ``put`` writes the payloads of its new samples as one blob (one file or object per commit batch, like the
SQLite store's segments), waits until the blob is durable, then inserts the rows with
``ON CONFLICT (device_id, seq) DO NOTHING`` in one transaction. A committed row therefore always points at
durable bytes, and two gateways that take the same sample at once (a device that reconnected elsewhere) store
it once: the primary key decides, and the loser's bytes stay unreferenced (the sample was stored by the other
gateway). A crash between blob and commit leaves unreferenced bytes too; that sample was never acked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence

from cloud.blobs import BlobStore
from cloud.db import PostgresDatabase
from cloud.samples.base import Sample, SampleStore

_PAGE = 256
_MAX_GAP = 256 * 1024  # read across another device's bytes rather than issue a second request


class PostgresSampleStore(SampleStore):
    """Samples keyed by (device_id, seq) in a database shared by every gateway and the trainer."""

    def __init__(self, db: PostgresDatabase, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    def _existing(self, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        with self.db.transaction() as cur:
            cur.execute(
                "SELECT s.device_id, s.seq FROM samples s"
                " JOIN unnest(%s::text[], %s::bigint[]) AS k(device_id, seq)"
                " ON s.device_id = k.device_id AND s.seq = k.seq",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            return {(d, int(q)) for d, q in cur.fetchall()}

    def put(self, samples: Sequence[Sample]) -> list[bool]:
        if not samples:
            return []
        existing = self._existing([(s.device_id, s.seq) for s in samples])
        fresh: list[Sample] = []
        for s in samples:
            key = (s.device_id, s.seq)
            if key not in existing:
                existing.add(key)  # a second copy in the same batch is a duplicate
                fresh.append(s)
        if not fresh:
            return [False] * len(samples)
        blob_key = f"samples/{uuid.uuid4().hex[:2]}/{uuid.uuid4().hex}"
        offsets = []
        pos = 0
        for s in fresh:
            offsets.append(pos)
            pos += len(s.payload)
        self.blobs.put(blob_key, b"".join(s.payload for s in fresh))  # durable before any row refers to it
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO samples (device_id, seq, blob_key, blob_offset, length, metadata, created_unix_ms,"
                " received_unix_ms) SELECT d, q, %s, o, n, m::jsonb, c, r FROM unnest(%s::text[], %s::bigint[],"
                " %s::bigint[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[]) AS t(d, q, o, n, m, c, r)"
                " ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq",
                (
                    blob_key,
                    [s.device_id for s in fresh],
                    [s.seq for s in fresh],
                    offsets,
                    [len(s.payload) for s in fresh],
                    [json.dumps(s.metadata, sort_keys=True) for s in fresh],
                    [s.created_unix_ms for s in fresh],
                    [s.received_unix_ms for s in fresh],
                ),
            )
            inserted = {(d, int(q)) for d, q in cur.fetchall()}
        if not inserted:  # another gateway stored all of them meanwhile: nothing refers to the blob
            self.blobs.delete(blob_key)
        fresh_ids = {id(s) for s in fresh}
        return [id(s) in fresh_ids and (s.device_id, s.seq) in inserted for s in samples]

    def high_water(self, device_id: str) -> int:
        with self.db.transaction() as cur:
            cur.execute("SELECT MAX(seq) FROM samples WHERE device_id = %s", (device_id,))
            row = cur.fetchone()
        return int(row[0] or 0) if row else 0

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
            with self.db.transaction() as cur:
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
        with self.db.transaction() as cur:
            if device_id is None:
                cur.execute("SELECT COUNT(*) FROM samples")
            else:
                cur.execute("SELECT COUNT(*) FROM samples WHERE device_id = %s", (device_id,))
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def devices(self) -> list[str]:
        with self.db.transaction() as cur:
            cur.execute("SELECT DISTINCT device_id FROM samples ORDER BY device_id")
            return [r[0] for r in cur.fetchall()]

    def close(self) -> None:
        self.db.close()
        self.blobs.close()
