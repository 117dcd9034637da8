"""Update registry: metadata and signatures in SQLite, payload blobs as content-addressed files."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from cloud.db import open_sqlite
from cloud.updates.base import UpdateRecord, UpdateRegistry
from common.codec import sha256_hex
from common.errors import TandemError
from common.signing import Ed25519PrivateKey
from common.update_header import VERSION_RE, UpdateHeader
from protocol.payload import describe_payload

_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS updates_cohort ON updates (cohort, update_id);
"""
_COLUMNS = (
    "update_id, device_id, cohort, base_version, target_version, sha256, size, metadata, created_unix_ms,"
    " signature, key_id, payload_info"
)


class PublishError(TandemError):
    """An update cannot be published (bad versions or addressing)."""


class SqliteUpdateRegistry(UpdateRegistry):
    """Updates under ``data_dir``: ``updates.db`` (WAL) plus ``blobs/<sha256>`` files written atomically."""

    def __init__(self, data_dir: str | Path, signing_key: Ed25519PrivateKey, synchronous: str = "FULL") -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        self._conn = open_sqlite(self.data_dir / "updates.db", synchronous)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)

    def publish(self, device_id, base_version, target_version, payload, metadata=None) -> UpdateRecord:
        if not device_id:
            raise PublishError("device_id must not be empty")
        return self._publish(device_id, "", base_version, target_version, payload, metadata)

    def publish_cohort(self, cohort, base_version, target_version, payload, metadata=None) -> UpdateRecord:
        if not cohort:
            raise PublishError("cohort must not be empty")
        return self._publish("", cohort, base_version, target_version, payload, metadata)

    def _publish(
        self, device_id: str, cohort: str, base: str, target: str, payload: bytes, metadata: dict | None
    ) -> UpdateRecord:
        for name, value in (("base_version", base), ("target_version", target)):
            if not isinstance(value, str) or not VERSION_RE.match(value):
                raise PublishError(f"{name} {value!r} must be 1-128 chars of [A-Za-z0-9._:+-]")
        if base == target:
            raise PublishError("target_version must differ from base_version")
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        digest = sha256_hex(payload)
        self._write_blob(digest, payload)
        header = UpdateHeader(device_id, cohort, base, target, digest, len(payload), meta)
        signature, kid = header.sign(self._key)
        info = describe_payload(payload).SerializeToString()
        created = int(time.time() * 1000)
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO updates (device_id, cohort, base_version, target_version, sha256, size,"
                " metadata, created_unix_ms, signature, key_id, payload_info)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    cohort,
                    base,
                    target,
                    digest,
                    len(payload),
                    json.dumps(meta, sort_keys=True),
                    created,
                    signature,
                    kid,
                    info,
                ),
            )
            update_id = int(cur.lastrowid or 0)
        return UpdateRecord(
            update_id,
            device_id,
            cohort,
            base,
            target,
            digest,
            len(payload),
            meta,
            created,
            signature,
            kid,
            info,
        )

    def _write_blob(self, digest: str, payload: bytes) -> None:
        path = self.blob_dir / digest
        if path.exists() and path.stat().st_size == len(payload):
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.blob_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def blob_path(self, record: UpdateRecord) -> Path:
        """File holding the payload of ``record``."""
        return self.blob_dir / record.sha256_hex

    def get(self, update_id: int) -> UpdateRecord | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM updates WHERE update_id = ?", (update_id,)).fetchone()
        return _record(row) if row else None

    def list(self, device_id=None, cohort=None, after_id=0) -> list[UpdateRecord]:
        sql = f"SELECT {_COLUMNS} FROM updates WHERE update_id > ?"
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
                f"SELECT {_COLUMNS} FROM updates WHERE update_id > ? AND (device_id = ? OR (cohort != '' AND"
                " cohort = ?)) ORDER BY update_id",
                (after_id, device_id, cohort),
            ).fetchall()
        return [_record(r) for r in rows]

    def read_payload(self, update_id: int, offset: int, length: int) -> bytes:
        record = self.get(update_id)
        if record is None:
            raise KeyError(update_id)
        with open(self.blob_path(record), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def latest_id(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(update_id) FROM updates").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _record(row: tuple) -> UpdateRecord:
    return UpdateRecord(
        update_id=int(row[0]),
        device_id=row[1],
        cohort=row[2],
        base_version=row[3],
        target_version=row[4],
        sha256_hex=row[5],
        size=int(row[6]),
        metadata=json.loads(row[7]),
        created_unix_ms=int(row[8]),
        signature=bytes(row[9]),
        key_id=row[10],
        payload_info=bytes(row[11]),
    )
