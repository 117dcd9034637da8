"""The device registry in PostgreSQL: the same interface as ``cloud.devices.DeviceRegistry``, shared by every
gateway (a device may reconnect to any of them with its token)."""

from __future__ import annotations

import hmac
import secrets

from psycopg.types.json import Jsonb

from cloud.db import PostgresDatabase
from cloud.devices import DeviceRecord, DeviceStateError, RollbackEvent, _hash, _now_ms

_ROLLBACK_LOCK = 0x726F6C6C  # "roll": rollback event ids commit in id order
_COLUMNS = (
    "device_id, cohort, model_family, model_version, capabilities, registered_unix_ms, applied_version,"
    " status, metrics, last_seen_unix_ms, revoked, enrollment_sha256 IS NOT NULL"
)


class PostgresDeviceRegistry:
    """Devices and their token hashes in the shared database."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def _one(self, where: str, args: tuple) -> DeviceRecord | None:
        with self.db.cursor() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM devices WHERE {where}", args)
            row = cur.fetchone()
        return _record(row) if row else None

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
        with self.db.transaction() as cur:
            cur.execute("SELECT revoked FROM devices WHERE device_id = %s FOR UPDATE", (device_id,))
            row = cur.fetchone()
            if row is not None and row[0]:
                raise DeviceStateError(f"device {device_id} is revoked; an operator must provision it again")
            cur.execute(
                "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
                " registered_unix_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (device_id) DO UPDATE SET token_sha256 = excluded.token_sha256,"
                " cohort = excluded.cohort, model_family = excluded.model_family,"
                " model_version = excluded.model_version, capabilities = excluded.capabilities,"
                f" enrollment_sha256 = NULL RETURNING {_COLUMNS}",
                (device_id, _hash(token), cohort, model_family, model_version, Jsonb(capabilities), _now_ms()),
            )
            out = cur.fetchone()
        assert out is not None
        return _record(out), token

    def get(self, device_id: str) -> DeviceRecord | None:
        """The device's record, or None."""
        return self._one("device_id = %s", (device_id,))

    def authenticate(self, token: str) -> DeviceRecord | None:
        """The live (not revoked) device holding ``token``, or None."""
        return self._one("token_sha256 = %s AND NOT revoked", (_hash(token),))

    def heartbeat(self, device_id: str, *, status: str, applied_version: str, metrics: dict) -> None:
        """Record the device's latest status, applied version and metrics."""
        with self.db.cursor() as cur:
            cur.execute(
                "UPDATE devices SET status = %s, applied_version = %s, metrics = %s, last_seen_unix_ms = %s"
                " WHERE device_id = %s",
                (status, applied_version, Jsonb(metrics), _now_ms(), device_id),
            )

    def record_rollback(self, device_id: str, from_version: str, to_version: str, reason: str) -> None:
        """Remember a rollback the device reported (the trainer rebases the device's mirror on it)."""
        with self.db.transaction() as cur:  # event ids commit in id order, like update ids
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_ROLLBACK_LOCK,))
            cur.execute(
                "INSERT INTO rollbacks (device_id, from_version, to_version, reason, unix_ms)"
                " VALUES (%s, %s, %s, %s, %s)",
                (device_id, from_version, to_version, reason, _now_ms()),
            )

    def rollbacks(self, after_id: int = 0) -> list[RollbackEvent]:
        """Rollback events with id > ``after_id``, oldest first."""
        with self.db.cursor() as cur:
            cur.execute(
                "SELECT event_id, device_id, from_version, to_version, reason, unix_ms FROM rollbacks"
                " WHERE event_id > %s ORDER BY event_id",
                (after_id,),
            )
            return [RollbackEvent(int(r[0]), r[1], r[2], r[3], r[4], int(r[5])) for r in cur.fetchall()]

    def touch(self, device_id: str, applied_version: str | None = None) -> None:
        """Mark the device as seen now (and optionally record its applied version)."""
        with self.db.cursor() as cur:
            if applied_version:
                cur.execute(
                    "UPDATE devices SET last_seen_unix_ms = %s, applied_version = %s WHERE device_id = %s",
                    (_now_ms(), applied_version, device_id),
                )
            else:
                cur.execute("UPDATE devices SET last_seen_unix_ms = %s WHERE device_id = %s", (_now_ms(), device_id))

    def revoke(self, device_id: str) -> bool:
        """Invalidate the device's token (and any enrollment code); True if the device exists."""
        with self.db.cursor() as cur:
            cur.execute(
                "UPDATE devices SET revoked = TRUE, enrollment_sha256 = NULL WHERE device_id = %s", (device_id,)
            )
            return cur.rowcount == 1

    def provision(self, device_id: str, cohort: str) -> str:
        """Admit ``device_id`` (new, revoked or still provisioned) in ``cohort``; returns its one-time code.

        An active device raises DeviceStateError (revoke it first).
        """
        code = secrets.token_urlsafe(24)
        with self.db.transaction() as cur:
            cur.execute("SELECT revoked, enrollment_sha256 FROM devices WHERE device_id = %s FOR UPDATE", (device_id,))
            row = cur.fetchone()
            if row is not None and not row[0] and row[1] is None:
                raise DeviceStateError(f"device {device_id} is registered and active; revoke it first")
            cur.execute(
                "INSERT INTO devices (device_id, token_sha256, cohort, model_family, model_version, capabilities,"
                " registered_unix_ms, enrollment_sha256) VALUES (%s, %s, %s, '', '', '{}', %s, %s)"
                " ON CONFLICT (device_id) DO UPDATE SET token_sha256 = excluded.token_sha256,"
                " cohort = excluded.cohort, revoked = FALSE, enrollment_sha256 = excluded.enrollment_sha256",
                (device_id, _hash(secrets.token_urlsafe(32)), cohort, _now_ms(), _hash(code)),
            )
        return code

    def check_enrollment_code(self, device_id: str, code: str) -> bool:
        """True if ``device_id`` is provisioned and ``code`` is its enrollment code."""
        with self.db.cursor() as cur:
            cur.execute("SELECT enrollment_sha256 FROM devices WHERE device_id = %s AND NOT revoked", (device_id,))
            row = cur.fetchone()
        return bool(code) and row is not None and row[0] is not None and hmac.compare_digest(row[0], _hash(code))

    def set_cohort(self, device_id: str, cohort: str) -> bool:
        """Move a device to ``cohort`` (the operator's decision); True if the device exists."""
        with self.db.cursor() as cur:
            cur.execute("UPDATE devices SET cohort = %s WHERE device_id = %s", (cohort, device_id))
            return cur.rowcount == 1

    def list(self) -> list[DeviceRecord]:
        """Every registered device."""
        with self.db.cursor() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY device_id")
            return [_record(r) for r in cur.fetchall()]

    def close(self) -> None:
        """Release the connection."""
        self.db.close()


def _record(row: tuple) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        cohort=row[1],
        model_family=row[2],
        model_version=row[3],
        capabilities=dict(row[4]),
        registered_unix_ms=int(row[5]),
        applied_version=row[6],
        status=row[7],
        metrics=dict(row[8]),
        last_seen_unix_ms=int(row[9]),
        revoked=bool(row[10]),
        provisioned=bool(row[11]) and not row[10],
    )
