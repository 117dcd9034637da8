"""Registered devices and their bearer tokens (only sha256 hashes of tokens and enrollment codes are stored).

A device is *provisioned* (the operator created it with a one-time enrollment code and its cohort), *active*
(it registered and holds a token) or *revoked* (its token is dead; only the operator re-admits it, with
``provision``, which issues a new code).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cloud.db import open_sqlite
from cloud.migrations import migrate_sqlite
from common import clock as clocks
from common.errors import TandemError

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
_MIGRATIONS = {"enrollment_sha256": "ALTER TABLE devices ADD COLUMN enrollment_sha256 TEXT"}


class DeviceStateError(TandemError):
    """The operation does not fit the device's state (a revoked id registering, an active id provisioned)."""


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
    provisioned: bool = False
    """Created by the operator and waiting for its first Register (no live token yet)."""

    @property
    def state(self) -> str:
        """``provisioned``, ``active`` or ``revoked``."""
        return "revoked" if self.revoked else "provisioned" if self.provisioned else "active"


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
    return clocks.current().now_ms()


class DeviceRegistry:
    """SQLite table of devices; issues tokens at registration and resolves tokens to devices."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self._conn = open_sqlite(path, synchronous)
        self._lock = threading.Lock()
        migrate_sqlite(self._conn, (_SCHEMA,), f"device registry {path}")
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(devices)")}
        for column, ddl in _MIGRATIONS.items():
            if column not in columns:
                self._conn.execute(ddl)

    def register(
        self,
        device_id: str,
        *,
        cohort: str,
        model_family: str,
        model_version: str,
        capabilities: dict,
    ) -> tuple[DeviceRecord, str]:
        """Create or re-enrol ``device_id`` with a fresh token; returns the record and the token.

        A revoked id raises DeviceStateError: only ``provision`` (an operator command) re-admits it.
        """
        token = secrets.token_urlsafe(32)
        with self._lock:
            row = self._conn.execute("SELECT revoked FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if row is not None and row[0]:
                raise DeviceStateError(f"device {device_id} is revoked; an operator must provision it again")
            self._conn.execute(
                "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version,"
                " capabilities, registered_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(device_id) DO UPDATE SET token_sha256=excluded.token_sha256,"
                " cohort=excluded.cohort, model_family=excluded.model_family,"
                " model_version=excluded.model_version, capabilities=excluded.capabilities, enrollment_sha256=NULL",
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
        """Invalidate the device's token (and any enrollment code); True if the device exists."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE devices SET revoked=1, enrollment_sha256=NULL WHERE device_id=?", (device_id,)
            )
        return cur.rowcount == 1

    def provision(self, device_id: str, cohort: str) -> str:
        """Admit ``device_id`` (new, revoked or still provisioned) in ``cohort``; returns its one-time code.

        The code is what the device presents as ``enrollment_secret`` in its first Register. Any earlier
        token of the id stops working. An active device raises DeviceStateError (revoke it first).
        """
        code = secrets.token_urlsafe(24)
        with self._lock:
            row = self._conn.execute(
                "SELECT revoked, enrollment_sha256 FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is not None and not row[0] and row[1] is None:
                raise DeviceStateError(f"device {device_id} is registered and active; revoke it first")
            self._conn.execute(
                "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
                " registered_unix_ms, enrollment_sha256) VALUES (?, ?, ?, '', '', '{}', ?, ?)"
                " ON CONFLICT(device_id) DO UPDATE SET token_sha256=excluded.token_sha256, cohort=excluded.cohort,"
                " revoked=0, enrollment_sha256=excluded.enrollment_sha256",
                (device_id, _hash(secrets.token_urlsafe(32)), cohort, _now_ms(), _hash(code)),
            )
        return code

    def check_enrollment_code(self, device_id: str, code: str) -> bool:
        """True if ``device_id`` is provisioned and ``code`` is its enrollment code."""
        with self._lock:
            row = self._conn.execute(
                "SELECT enrollment_sha256 FROM devices WHERE device_id = ? AND revoked = 0", (device_id,)
            ).fetchone()
        return bool(code) and row is not None and row[0] is not None and hmac.compare_digest(row[0], _hash(code))

    def set_cohort(self, device_id: str, cohort: str) -> bool:
        """Move a device to ``cohort`` (the operator's decision); True if the device exists."""
        with self._lock:
            cur = self._conn.execute("UPDATE devices SET cohort=? WHERE device_id=?", (cohort, device_id))
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
    " status, metrics, last_seen_unix_ms, revoked, enrollment_sha256 IS NOT NULL"
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
        provisioned=bool(row[11]) and not row[10],
    )
