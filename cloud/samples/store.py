"""The sample store on SQL (SQLAlchemy Core): rows in SQLite or PostgreSQL, payload bytes in a payload store
(``cloud.samples.payloads``: segment files for one gateway, blobs shared by several).

A ``commit`` writes the batch's payloads durably, then inserts their rows with
``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING RETURNING`` and reads the devices' high-waters in the same
transaction. A resent sample's bytes are written again and left unreferenced (a batch of resends only is
discarded at once). A committed row therefore always points at durable bytes, and two gateways that take the same
sample at once (a device that reconnected elsewhere) store it once: the primary key decides.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy import Engine, bindparam, func, select

from cloud import sql
from cloud.migrations import migrated_sqlite
from cloud.samples.base import Committed, PendingStats, Sample, SampleStore
from cloud.samples.payloads import SEGMENT_BYTES, PayloadStore, SegmentPayloads
from cloud.schemas import SAMPLES

_S = sql.samples.c
# Built once: a hot path pays for executing a statement, not for building it.
_HIGH_WATER = select(func.max(_S.seq)).where(_S.device_id == bindparam("id"))
_HIGH_WATERS = (
    select(_S.device_id, func.max(_S.seq))
    .where(_S.device_id.in_(bindparam("ids", expanding=True)))
    .group_by(_S.device_id)
)
_ALL_HIGH_WATERS = select(_S.device_id, func.max(_S.seq)).group_by(_S.device_id)
_PAGE = 256
_MAX_GAP = 256 * 1024  # read across another device's bytes rather than issue a second request


class SqlSampleStore(SampleStore):
    """Samples keyed by (device_id, seq) in one SQL database; a key that exists is skipped (idempotent writes)."""

    concurrent_reads = True

    def __init__(self, engine: Engine, payloads: PayloadStore) -> None:
        self.engine = engine
        self.payloads = payloads
        self._inserts: dict[str, object] = {}

    def commit(self, samples: Sequence[Sample]) -> Committed:
        if not samples:
            return Committed([], {})
        fresh: dict[tuple[str, int], Sample] = {}
        for s in samples:
            fresh.setdefault((s.device_id, s.seq), s)  # a second copy in the same batch is a duplicate
        batch = list(fresh.values())
        blob_key, offsets = self.payloads.write([s.payload for s in batch])  # durable before any row refers to it
        rows = [
            dict(device_id=s.device_id, seq=s.seq, blob_key=blob_key, blob_offset=off, length=len(s.payload),
                 metadata=s.metadata, created_unix_ms=s.created_unix_ms, received_unix_ms=s.received_unix_ms)
            for s, off in zip(batch, offsets, strict=True)
        ]  # fmt: skip
        ids = sorted({s.device_id for s in batch})
        if self.engine.dialect.name == "postgresql":
            inserted, high = self._insert_autocommit(rows, ids)
        else:
            with sql.write(self.engine) as conn:
                inserted = {(d, int(q)) for d, q in conn.execute(self._insert(conn), rows)}
                high = dict.fromkeys(ids, 0)
                high.update({d: int(q) for d, q in conn.execute(_HIGH_WATERS, {"ids": ids})})
        if not inserted:  # every sample was stored before (a resend): nothing refers to the batch
            self.payloads.discard(blob_key)
        new = [s is fresh[(s.device_id, s.seq)] and (s.device_id, s.seq) in inserted for s in samples]
        return Committed(new, high)

    def _insert_autocommit(self, rows: list[dict], ids: list[str]) -> tuple[set[tuple[str, int]], dict[str, int]]:
        """PostgreSQL: the INSERT (one statement for up to 1,000 rows: atomic, and durable once it returns) and the
        high-waters after it, each in autocommit: two round trips instead of four (BEGIN, INSERT, SELECT,
        COMMIT). Rows of a larger batch go in several statements; an error still acks none of them."""
        with self.engine.connect() as conn:
            inserted = {(d, int(q)) for d, q in conn.execute(self._insert(conn), rows)}
            high = dict.fromkeys(ids, 0)
            high.update({d: int(q) for d, q in conn.execute(_HIGH_WATERS, {"ids": ids})})
        return inserted, high

    def _insert(self, conn):
        """``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq`` in the dialect."""
        stmt = self._inserts.get(conn.dialect.name)
        if stmt is None:
            stmt = sql.upsert(conn, sql.samples).on_conflict_do_nothing(index_elements=["device_id", "seq"])
            stmt = self._inserts[conn.dialect.name] = stmt.returning(_S.device_id, _S.seq)
        return stmt

    def pending_stats(self, device_id: str, after_seq: int, limit: int) -> PendingStats:
        page = select(_S.seq, _S.length).where(_S.device_id == device_id, _S.seq > after_seq)
        page = page.order_by(_S.seq).limit(limit).subquery()
        query = select(func.count(), func.coalesce(func.sum(page.c.length), 0), func.coalesce(func.max(page.c.seq), 0))
        with self.engine.connect() as conn:
            n, size, upto = conn.execute(query).one()
        return PendingStats(int(n), int(size), int(upto))

    def high_water(self, device_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(_HIGH_WATER, {"id": device_id}).scalar() or 0)

    def high_waters(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {str(d): int(q) for d, q in conn.execute(_ALL_HIGH_WATERS)}

    def _read(self, rows: list) -> list[bytes]:
        """Payloads of ``rows`` (blob_key, offset, length, ...): one read per run of nearby bytes."""
        out: list[bytes] = []
        i = 0
        while i < len(rows):
            key, start, end = rows[i][0], int(rows[i][1]), int(rows[i][1]) + int(rows[i][2])
            j = i + 1
            while j < len(rows) and rows[j][0] == key and end <= rows[j][1] <= end + _MAX_GAP:
                end = int(rows[j][1]) + int(rows[j][2])
                j += 1
            span = self.payloads.read(key, start, end - start)
            for _, off, length, *_ in rows[i:j]:
                data = span[off - start : off - start + length]
                if len(data) != length:
                    raise OSError(f"payload {key} is shorter than its rows say (offset {off}, length {length})")
                out.append(data)
            i = j
        return out

    def iter_samples(self, device_id: str, after_seq: int = 0, limit: int | None = None) -> Iterator[Sample]:
        columns = (_S.blob_key, _S.blob_offset, _S.length, _S.seq, _S.metadata, _S.created_unix_ms,
                   _S.received_unix_ms)  # fmt: skip
        remaining, cursor = limit, after_seq
        while remaining is None or remaining > 0:
            n = _PAGE if remaining is None else min(_PAGE, remaining)
            query = select(*columns).where(_S.device_id == device_id, _S.seq > cursor).order_by(_S.seq).limit(n)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for (_, _, _, seq, meta, created, received), payload in zip(rows, self._read(rows), strict=True):
                yield Sample(device_id, int(seq), payload, dict(meta), int(created), int(received))
            cursor = int(rows[-1][3])
            if remaining is not None:
                remaining -= len(rows)

    def count(self, device_id: str | None = None) -> int:
        query = select(func.count()).select_from(sql.samples)
        if device_id is not None:
            query = query.where(_S.device_id == device_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def devices(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(_S.device_id).distinct().order_by(_S.device_id)).scalars())

    def close(self) -> None:
        self.engine.dispose()
        self.payloads.close()


class SqliteSampleStore(SqlSampleStore):
    """One gateway's store: ``path`` (SQLite, WAL) and segment files in ``<stem>.segments/`` beside it."""

    def __init__(self, path: str | Path, synchronous: str = "FULL", segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = Path(path)
        engine = migrated_sqlite(self.path, synchronous, SAMPLES, "sample store")
        segments = SegmentPayloads(self.path.parent / f"{self.path.stem}.segments", synchronous == "FULL",
                                   segment_bytes)  # fmt: skip
        super().__init__(engine, segments)
