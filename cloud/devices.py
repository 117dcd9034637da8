"""Registered devices and their bearer tokens (only sha256 hashes of tokens and enrollment codes are stored).

A device is *provisioned* (the operator created it with a one-time enrollment code and its cohort), *active*
(it registered and holds a token) or *revoked* (its token is dead; only the operator re-admits it, with
``provision``, which issues a new code).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Connection, Engine, Row, bindparam, select, update

from cloud import sql
from cloud.migrations import migrated_sqlite
from cloud.schemas import DEVICES
from common import clock as clocks
from common.errors import TandemError

if TYPE_CHECKING:
    from cloud.device_tokens import TokenWatch

TOKEN_CHANNEL = "tandem_devices"  # NOTIFY after a token change (cloud.device_tokens LISTENs)
_ROLLBACK_LOCK = 0x726F6C6C  # "roll": rollback event ids commit in id order (PostgreSQL)


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
class Heartbeat:
    """What one heartbeat records of a device."""

    device_id: str
    status: str
    applied_version: str
    metrics: dict


@dataclass(frozen=True)
class RollbackEvent:
    """A device reported that it left ``from_version`` and holds ``to_version`` again."""

    event_id: int
    device_id: str
    from_version: str
    to_version: str
    reason: str
    unix_ms: int


def token_hash(token: str) -> str:
    """What the registry stores of a token or enrollment code: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _now_ms() -> int:
    return clocks.current().now_ms()


class Devices(Protocol):
    """The device registry's interface (one SQL implementation, ``DeviceRegistry``, on SQLite or PostgreSQL)."""

    def register(
        self, device_id: str, *, cohort: str, model_family: str, model_version: str, capabilities: dict
    ) -> tuple[DeviceRecord, str]: ...
    def get(self, device_id: str) -> DeviceRecord | None: ...
    def authenticate(self, token: str) -> DeviceRecord | None: ...
    def heartbeat(self, device_id: str, *, status: str, applied_version: str, metrics: dict) -> None: ...
    def record_heartbeats(self, beats: Sequence[Heartbeat]) -> None: ...
    def record_rollback(self, device_id: str, from_version: str, to_version: str, reason: str) -> None: ...
    def rollbacks(self, after_id: int = 0) -> list[RollbackEvent]: ...
    def touch(self, device_id: str, applied_version: str | None = None) -> None: ...
    def revoke(self, device_id: str) -> bool: ...
    def provision(self, device_id: str, cohort: str) -> str: ...
    def check_enrollment_code(self, device_id: str, code: str) -> bool: ...
    def set_cohort(self, device_id: str, cohort: str) -> bool: ...
    def list(self) -> list[DeviceRecord]: ...
    def watch_tokens(self, on_change: Callable[[], None]) -> TokenWatch | None: ...
    def close(self) -> None: ...


_D = sql.devices.c
_COLUMNS = (
    _D.device_id, _D.cohort, _D.model_family, _D.model_version, _D.capabilities, _D.registered_unix_ms,
    _D.applied_version, _D.status, _D.metrics, _D.last_seen_unix_ms, _D.revoked,
    _D.enrollment_sha256.is_not(None),
)  # fmt: skip


_HEARTBEAT = update(sql.devices).where(_D.device_id == bindparam("d"))


class DeviceRegistry:
    """Devices and their token hashes in SQL: a SQLite file (``path``) for one gateway, or the PostgreSQL
    database every gateway shares (an ``Engine``, see ``cloud.stores``)."""

    def __init__(self, where: str | Path | Engine, synchronous: str = "FULL", dsn: str | None = None) -> None:
        self._path: Path | None = None
        self._dsn = dsn
        self._on_change: list[Callable[[], None]] = []
        if isinstance(where, Engine):
            self.engine = where
        else:
            self._path = Path(where)
            self.engine = migrated_sqlite(where, synchronous, DEVICES, "device registry")

    def _one(self, *where) -> DeviceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(*_COLUMNS).where(*where)).first()
        return _record(row) if row else None

    def _set(self, device_id: str, **values) -> bool:
        with sql.write(self.engine) as conn:
            return conn.execute(update(sql.devices).where(_D.device_id == device_id).values(**values)).rowcount == 1

    @contextmanager
    def _token_change(self) -> Iterator[Connection]:
        """A write transaction that changes who holds which token (or a device's cohort): it bumps the token
        epoch and notifies (PostgreSQL); after it ends, this process's token caches are emptied."""
        try:
            with sql.write(self.engine) as conn:
                yield conn
                conn.execute(update(sql.device_epoch).values(epoch=sql.device_epoch.c.epoch + 1))
                sql.notify(conn, TOKEN_CHANNEL, "")
        finally:
            for callback in list(self._on_change):
                callback()

    def watch_tokens(self, on_change: Callable[[], None]) -> TokenWatch | None:
        """Call ``on_change`` after every token change this registry commits, and watch other processes' (see
        ``cloud.device_tokens``); None where no watch can run (then nothing may be cached)."""
        from cloud.device_tokens import ListenTokenWatch, SqliteTokenWatch

        if self._path is not None:
            self._on_change.append(on_change)
            return SqliteTokenWatch(self._path)
        if self._dsn is not None:
            self._on_change.append(on_change)
            return ListenTokenWatch(self._dsn, on_change)
        return None

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
        fields = dict(cohort=cohort, model_family=model_family, model_version=model_version)
        with self._token_change() as conn:
            revoked = conn.execute(select(_D.revoked).where(_D.device_id == device_id).with_for_update()).scalar()
            if revoked:
                raise DeviceStateError(f"device {device_id} is revoked; an operator must provision it again")
            stmt = sql.upsert(conn, sql.devices).values(
                device_id=device_id, token_sha256=token_hash(token), capabilities=capabilities,
                registered_unix_ms=_now_ms(), **fields,
            )  # fmt: skip
            changed = dict(token_sha256=stmt.excluded.token_sha256, capabilities=stmt.excluded.capabilities, **fields)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=[_D.device_id], set_=dict(changed, enrollment_sha256=None))
            )
            row = conn.execute(select(*_COLUMNS).where(_D.device_id == device_id)).one()
        return _record(row), token

    def get(self, device_id: str) -> DeviceRecord | None:
        """The device's record, or None."""
        return self._one(_D.device_id == device_id)

    def authenticate(self, token: str) -> DeviceRecord | None:
        """The live (not revoked) device holding ``token``, or None."""
        return self._one(_D.token_sha256 == token_hash(token), _D.revoked.is_(False))

    def heartbeat(self, device_id: str, *, status: str, applied_version: str, metrics: dict) -> None:
        """Record the device's latest status, applied version and metrics."""
        self.record_heartbeats([Heartbeat(device_id, status, applied_version, metrics)])

    def record_heartbeats(self, beats: Sequence[Heartbeat]) -> None:
        """Record several heartbeats in one transaction (in order: a device's last one wins)."""
        if not beats:
            return
        now = _now_ms()
        rows = [dict(d=b.device_id, status=b.status, applied_version=b.applied_version, metrics=b.metrics,
                     last_seen_unix_ms=now) for b in beats]  # fmt: skip
        with sql.write(self.engine) as conn:
            conn.execute(_HEARTBEAT, rows)

    def record_rollback(self, device_id: str, from_version: str, to_version: str, reason: str) -> None:
        """Remember a rollback the device reported (the trainer rebases the device's mirror on it)."""
        with sql.write(self.engine) as conn:
            sql.xact_lock(conn, _ROLLBACK_LOCK)  # event ids commit in id order, like update ids
            conn.execute(
                sql.rollbacks.insert().values(
                    device_id=device_id, from_version=from_version, to_version=to_version, reason=reason,
                    unix_ms=_now_ms(),
                )
            )  # fmt: skip

    def rollbacks(self, after_id: int = 0) -> list[RollbackEvent]:
        """Rollback events with id > ``after_id``, oldest first."""
        r = sql.rollbacks.c
        query = select(r.event_id, r.device_id, r.from_version, r.to_version, r.reason, r.unix_ms)
        with self.engine.connect() as conn:
            rows = conn.execute(query.where(r.event_id > after_id).order_by(r.event_id)).all()
        return [RollbackEvent(int(e), d, f, t, why, int(ms)) for e, d, f, t, why, ms in rows]

    def touch(self, device_id: str, applied_version: str | None = None) -> None:
        """Mark the device as seen now (and optionally record its applied version)."""
        extra = {"applied_version": applied_version} if applied_version else {}
        self._set(device_id, last_seen_unix_ms=_now_ms(), **extra)

    def revoke(self, device_id: str) -> bool:
        """Invalidate the device's token (and any enrollment code); True if the device exists."""
        with self._token_change() as conn:
            stmt = update(sql.devices).where(_D.device_id == device_id).values(revoked=True, enrollment_sha256=None)
            return conn.execute(stmt).rowcount == 1

    def provision(self, device_id: str, cohort: str) -> str:
        """Admit ``device_id`` (new, revoked or still provisioned) in ``cohort``; returns its one-time code.

        The code is what the device presents as ``enrollment_secret`` in its first Register. Any earlier
        token of the id stops working. An active device raises DeviceStateError (revoke it first).
        """
        code = secrets.token_urlsafe(24)
        with self._token_change() as conn:
            query = select(_D.revoked, _D.enrollment_sha256).where(_D.device_id == device_id).with_for_update()
            row = conn.execute(query).first()
            if row is not None and not row[0] and row[1] is None:
                raise DeviceStateError(f"device {device_id} is registered and active; revoke it first")
            stmt = sql.upsert(conn, sql.devices).values(
                device_id=device_id, token_sha256=token_hash(secrets.token_urlsafe(32)), cohort=cohort, model_family="",
                model_version="", capabilities={}, registered_unix_ms=_now_ms(), enrollment_sha256=token_hash(code),
            )  # fmt: skip
            x = stmt.excluded
            changed = dict(
                token_sha256=x.token_sha256, cohort=x.cohort, revoked=False, enrollment_sha256=x.enrollment_sha256
            )
            conn.execute(stmt.on_conflict_do_update(index_elements=[_D.device_id], set_=changed))
        return code

    def check_enrollment_code(self, device_id: str, code: str) -> bool:
        """True if ``device_id`` is provisioned and ``code`` is its enrollment code."""
        query = select(_D.enrollment_sha256).where(_D.device_id == device_id, _D.revoked.is_(False))
        with self.engine.connect() as conn:
            stored = conn.execute(query).scalar()
        return bool(code) and stored is not None and hmac.compare_digest(stored, token_hash(code))

    def set_cohort(self, device_id: str, cohort: str) -> bool:
        """Move a device to ``cohort`` (the operator's decision); True if the device exists."""
        with self._token_change() as conn:
            stmt = update(sql.devices).where(_D.device_id == device_id).values(cohort=cohort)
            return conn.execute(stmt).rowcount == 1

    def list(self) -> list[DeviceRecord]:
        """Every registered device."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(*_COLUMNS).order_by(_D.device_id)).all()
        return [_record(r) for r in rows]

    def close(self) -> None:
        """Release the database."""
        self._on_change.clear()
        self.engine.dispose()


def _record(row: Row) -> DeviceRecord:
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
