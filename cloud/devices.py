"""Registered devices and their bearer tokens (only sha256 hashes of tokens are stored)."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cloud.db import open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    cohort TEXT NOT NULL,
    model_family TEXT NOT NULL,
    model_version TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    registered_unix_ms INTEGER NOT NULL,
    applied_version TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    last_seen_unix_ms INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rollbacks (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    reason TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class DeviceRecord:
    """A registered device as the gateway knows it."""

    device_id: str
    cohort: str
    model_family: str
    model_version: str
    capabilities: dict
    registered_unix_ms: int
    applied_version: str
    status: str
    metrics: dict
    last_seen_unix_ms: int
    revoked: bool


@dataclass(frozen=True)
class RollbackEvent:
    """A device reported that it left ``from_version`` and holds ``to_version`` again."""

    event_id: int
    device_id: str
    from_version: str
    to_version: str
    reason: str
    unix_ms: int


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


class DeviceRegistry:
    """SQLite table of devices; issues tokens at registration and resolves tokens to devices."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self._conn = open_sqlite(path, synchronous)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)

    def register(
        self,
        device_id: str,
        *,
        cohort: str,
        model_family: str,
        model_version: str,
        capabilities: dict,
    ) -> tuple[DeviceRecord, str]:
        """Create or re-enrol ``device_id`` with a fresh token; returns the record and the token."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._conn.execute(
                "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version,"
                " capabilities, registered_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(device_id) DO UPDATE SET token_sha256=excluded.token_sha256,"
                " cohort=excluded.cohort, model_family=excluded.model_family,"
                " model_version=excluded.model_version, capabilities=excluded.capabilities, revoked=0",
                (
                    device_id,
                    _hash(token),
                    cohort,
                    model_family,
                    model_version,
                    json.dumps(capabilities, sort_keys=True),
                    _now_ms(),
                ),
            )
        record = self.get(device_id)
        assert record is not None
        return record, token

    def get(self, device_id: str) -> DeviceRecord | None:
        """The device's record, or None."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return _record(row) if row else None

    def authenticate(self, token: str) -> DeviceRecord | None:
        """The live (not revoked) device holding ``token``, or None."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM devices WHERE token_sha256 = ? AND revoked = 0", (_hash(token),)
            ).fetchone()
        return _record(row) if row else None

    def heartbeat(self, device_id: str, *, status: str, applied_version: str, metrics: dict) -> None:
        """Record the device's latest status, applied version and metrics."""
        with self._lock:
            self._conn.execute(
                "UPDATE devices SET status=?, applied_version=?, metrics=?, last_seen_unix_ms=? WHERE device_id=?",
                (status, applied_version, json.dumps(metrics, sort_keys=True), _now_ms(), device_id),
            )

    def record_rollback(self, device_id: str, from_version: str, to_version: str, reason: str) -> None:
        """Remember a rollback the device reported (the trainer rebases the device's mirror on it)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO rollbacks (device_id, from_version, to_version, reason, unix_ms) VALUES (?, ?, ?, ?, ?)",
                (device_id, from_version, to_version, reason, _now_ms()),
            )

    def rollbacks(self, after_id: int = 0) -> list[RollbackEvent]:
        """Rollback events with id > ``after_id``, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT event_id, device_id, from_version, to_version, reason, unix_ms FROM rollbacks"
                " WHERE event_id > ? ORDER BY event_id",
                (after_id,),
            ).fetchall()
        return [RollbackEvent(int(r[0]), r[1], r[2], r[3], r[4], int(r[5])) for r in rows]

    def touch(self, device_id: str, applied_version: str | None = None) -> None:
        """Mark the device as seen now (and optionally record its applied version)."""
        with self._lock:
            if applied_version:
                self._conn.execute(
                    "UPDATE devices SET last_seen_unix_ms=?, applied_version=? WHERE device_id=?",
                    (_now_ms(), applied_version, device_id),
                )
            else:
                self._conn.execute("UPDATE devices SET last_seen_unix_ms=? WHERE device_id=?", (_now_ms(), device_id))

    def revoke(self, device_id: str) -> bool:
        """Invalidate the device's token; True if the device exists."""
        with self._lock:
            cur = self._conn.execute("UPDATE devices SET revoked=1 WHERE device_id=?", (device_id,))
        return cur.rowcount == 1

    def list(self) -> list[DeviceRecord]:
        """Every registered device."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY device_id").fetchall()
        return [_record(r) for r in rows]

    def close(self) -> None:
        """Release the database."""
        with self._lock:
            self._conn.close()


_COLUMNS = (
    "device_id, cohort, model_family, model_version, capabilities, registered_unix_ms, applied_version,"
    " status, metrics, last_seen_unix_ms, revoked"
)


def _record(row: tuple) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        cohort=row[1],
        model_family=row[2],
        model_version=row[3],
        capabilities=json.loads(row[4]),
        registered_unix_ms=int(row[5]),
        applied_version=row[6],
        status=row[7],
        metrics=json.loads(row[8]),
        last_seen_unix_ms=int(row[9]),
        revoked=bool(row[10]),
    )
