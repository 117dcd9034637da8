"""The update registry on SQL (SQLAlchemy Core): rows and signatures in SQLite or PostgreSQL, payloads in a blob
store (files under the SQLite registry's directory, or the blob store every gateway shares).

Publishing holds the writer lock (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a transaction-scoped advisory lock) from
id assignment to commit, so update ids commit in id order: a watcher that has seen id n never misses a smaller id
that commits later. On PostgreSQL the same transaction sends ``NOTIFY tandem_updates``; every gateway LISTENs
(``cloud.listen``) and wakes its WatchUpdates streams at once, whichever process published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func, or_, select

from cloud import sql
from cloud.blobs import BlobStore, DirectoryBlobStore
from cloud.migrations import migrated_sqlite
from cloud.schemas import UPDATES
from cloud.updates.base import UpdateRecord, UpdateRegistry, record_from_row
from common.signing import Ed25519PrivateKey

CHANNEL = "tandem_updates"
_PUBLISH_LOCK = 0x7570646174  # "updat": serialises id assignment with commit (PostgreSQL)
_U = sql.updates.c
_COLUMNS = (_U.update_id, _U.device_id, _U.cohort, _U.base_version, _U.target_version, _U.sha256, _U.size,
            _U.metadata, _U.created_unix_ms, _U.signature, _U.key_id, _U.payload_info)  # fmt: skip


class SqlUpdateRegistry(UpdateRegistry):
    """Signed updates in one SQL database; payload ``<sha256>`` is stored once as blob ``blob_prefix + sha256``."""

    def __init__(
        self, engine: Engine, blobs: BlobStore, signing_key: Ed25519PrivateKey, blob_prefix: str = "",
        dsn: str | None = None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.blobs = blobs
        self._key = signing_key
        self._prefix = blob_prefix
        self._dsn = dsn
        self._listeners: list = []

    def _store(self, up: UpdateRecord, payload: bytes, job_id: int) -> UpdateRecord:
        blob_key = self._prefix + up.sha256_hex
        if not (self.blobs.exists(blob_key) and self.blobs.size(blob_key) == up.size):
            self.blobs.put(blob_key, payload)  # durable before any row refers to it
        h = up.header
        row = dict(
            device_id=h.device_id, cohort=h.cohort, base_version=h.base_version, target_version=h.target_version,
            sha256=h.sha256_hex, size=h.size, metadata=h.metadata, created_unix_ms=up.created_unix_ms,
            signature=up.signature, key_id=up.key_id, payload_info=up.payload_info, blob_key=blob_key, job_id=job_id,
        )  # fmt: skip
        with sql.write(self.engine) as conn:
            sql.xact_lock(conn, _PUBLISH_LOCK)
            update_id = conn.execute(sql.updates.insert().values(**row).returning(_U.update_id)).scalar_one()
            sql.notify(conn, CHANNEL, str(update_id))
        return dataclasses.replace(up, update_id=int(update_id))

    def _select(self, *where) -> list[UpdateRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(*_COLUMNS).where(*where).order_by(_U.update_id)).all()
        return [record_from_row(tuple(r)) for r in rows]

    def get(self, update_id: int) -> UpdateRecord | None:
        rows = self._select(_U.update_id == update_id)
        return rows[0] if rows else None

    def by_job(self, job_id: int) -> UpdateRecord | None:
        rows = self._select(_U.job_id == job_id, _U.job_id > 0)
        return rows[0] if rows else None

    def list(self, device_id=None, cohort=None, after_id=0) -> list[UpdateRecord]:
        where = [_U.update_id > after_id]
        if device_id is not None:
            where.append(_U.device_id == device_id)
        if cohort is not None:
            where.append(_U.cohort == cohort)
        return self._select(*where)

    def for_device(self, device_id: str, cohort: str, after_id: int = 0) -> list[UpdateRecord]:
        mine = or_(_U.device_id == device_id, (_U.cohort != "") & (_U.cohort == cohort))
        return self._select(_U.update_id > after_id, mine)

    def latest_for_device(self, device_id: str, cohort: str) -> int:
        mine = or_(_U.device_id == device_id, (_U.cohort != "") & (_U.cohort == cohort))
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(_U.update_id)).where(mine)).scalar() or 0)

    def read_payload(self, update_id: int, offset: int, length: int) -> bytes:
        with self.engine.connect() as conn:
            key = conn.execute(select(_U.blob_key).where(_U.update_id == update_id)).scalar()
        if key is None:
            raise KeyError(update_id)
        return self.blobs.get(key, offset, length)

    def latest_id(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(_U.update_id))).scalar() or 0)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        if self._dsn is None:  # SQLite: watchers poll
            return lambda: None
        from cloud.listen import Listener

        listener = Listener(self._dsn, CHANNEL, callback)
        listener.start()
        self._listeners.append(listener)
        return listener.stop

    def close(self) -> None:
        for listener in self._listeners:
            listener.stop()
        self._listeners.clear()
        self.engine.dispose()
        self.blobs.close()


class SqliteUpdateRegistry(SqlUpdateRegistry):
    """The registry of one gateway: ``<data_dir>/updates.db`` (WAL) and ``<data_dir>/blobs/<sha256>`` files."""

    def __init__(self, data_dir: str | Path, signing_key: Ed25519PrivateKey, synchronous: str = "FULL") -> None:
        self.data_dir = Path(data_dir)
        path = self.data_dir / "updates.db"
        engine = migrated_sqlite(path, synchronous, UPDATES, "update registry")
        super().__init__(engine, DirectoryBlobStore(self.data_dir / "blobs"), signing_key)

    def blob_path(self, record: UpdateRecord) -> Path:
        """File holding the payload of ``record``."""
        return self.blobs.path(record.sha256_hex)  # type: ignore[attr-defined]
