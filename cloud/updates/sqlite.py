"""Update registry: metadata and signatures in SQLite, payload blobs as content-addressed files."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from cloud.blobs import DirectoryBlobStore
from cloud.db import open_sqlite
from cloud.migrations import migrate_sqlite
from cloud.updates.base import UPDATE_COLUMNS, UpdateRecord, UpdateRegistry, record_from_row
from cloud.updates.publishing import PublishError
from common.signing import Ed25519PrivateKey

__all__ = ["PublishError", "SqliteUpdateRegistry"]

_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS updates (
    update_id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    cohort TEXT NOT NULL,
    base_version TEXT NOT NULL,
    target_version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL,
    payload_info BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_device ON updates (device_id, update_id);
CREATE INDEX IF NOT EXISTS updates_cohort ON updates (cohort, update_id)
""",
    """
ALTER TABLE updates ADD COLUMN job_id INTEGER NOT NULL DEFAULT 0;
UPDATE updates SET job_id = CAST(json_extract(metadata, '$.job_id') AS INTEGER)
    WHERE json_extract(metadata, '$.job_id') IS NOT NULL;
CREATE UNIQUE INDEX updates_job ON updates (job_id) WHERE job_id > 0
""",
)


class SqliteUpdateRegistry(UpdateRegistry):
    """Updates under ``data_dir``: ``updates.db`` (WAL) plus ``blobs/<sha256>`` files written atomically."""

    def __init__(self, data_dir: str | Path, signing_key: Ed25519PrivateKey, synchronous: str = "FULL") -> None:
        self.data_dir = Path(data_dir)
        self._key = signing_key
        self._conn = open_sqlite(self.data_dir / "updates.db", synchronous)
        try:
            migrate_sqlite(self._conn, _MIGRATIONS, f"update registry {self.data_dir / 'updates.db'}")
        except BaseException:
            self._conn.close()
            raise
        self.blobs = DirectoryBlobStore(self.data_dir / "blobs")
        self._lock = threading.Lock()

    def _store(self, up: UpdateRecord, payload: bytes, job_id: int) -> UpdateRecord:
        if not (self.blobs.exists(up.sha256_hex) and self.blobs.size(up.sha256_hex) == up.size):
            self.blobs.put(up.sha256_hex, payload)
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO updates (device_id, cohort, base_version, target_version, sha256, size,"
                " metadata, created_unix_ms, signature, key_id, payload_info, job_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    up.device_id,
                    up.cohort,
                    up.base_version,
                    up.target_version,
                    up.sha256_hex,
                    up.size,
                    json.dumps(up.metadata, sort_keys=True),
                    up.created_unix_ms,
                    up.signature,
                    up.key_id,
                    up.payload_info,
                    job_id,
                ),
            )
            update_id = int(cur.lastrowid or 0)
        return dataclasses.replace(up, update_id=update_id)

    def blob_path(self, record: UpdateRecord) -> Path:
        """File holding the payload of ``record``."""
        return self.blobs.path(record.sha256_hex)

    def get(self, update_id: int) -> UpdateRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE update_id = ?", (update_id,)
            ).fetchone()
        return _record(row) if row else None

    def by_job(self, job_id: int) -> UpdateRecord | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {UPDATE_COLUMNS} FROM updates WHERE job_id = ?", (job_id,)).fetchone()
        return _record(row) if row and job_id > 0 else None

    def list(self, device_id=None, cohort=None, after_id=0) -> list[UpdateRecord]:
        sql = f"SELECT {UPDATE_COLUMNS} FROM updates WHERE update_id > ?"
        args: list = [after_id]
        if device_id is not None:
            sql += " AND device_id = ?"
            args.append(device_id)
        if cohort is not None:
            sql += " AND cohort = ?"
            args.append(cohort)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY update_id", args).fetchall()
        return [_record(r) for r in rows]

    def for_device(self, device_id: str, cohort: str, after_id: int = 0) -> list[UpdateRecord]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {UPDATE_COLUMNS} FROM updates WHERE update_id > ? AND (device_id = ? OR (cohort != '' AND"
                " cohort = ?)) ORDER BY update_id",
                (after_id, device_id, cohort),
            ).fetchall()
        return [_record(r) for r in rows]

    def read_payload(self, update_id: int, offset: int, length: int) -> bytes:
        record = self.get(update_id)
        if record is None:
            raise KeyError(update_id)
        return self.blobs.get(record.sha256_hex, offset, length)

    def latest_id(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(update_id) FROM updates").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _record(row: tuple) -> UpdateRecord:
    return record_from_row(row, json.loads)
