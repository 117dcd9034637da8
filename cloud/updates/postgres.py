"""Update registry in PostgreSQL (rows, signatures) with payloads in a shared blob store.

Publishing takes a transaction-scoped advisory lock, so update ids commit in id order: a watcher that has seen
id n never misses a smaller id that commits later. The same transaction sends ``NOTIFY tandem_updates``;
every gateway LISTENs and wakes its WatchUpdates streams at once, whichever process published.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from psycopg.types.json import Jsonb

from cloud.blobs import BlobStore
from cloud.db import PostgresDatabase, connect_postgres
from cloud.updates.base import UPDATE_COLUMNS, UpdateRecord, UpdateRegistry, record_from_row
from common.signing import Ed25519PrivateKey

log = logging.getLogger("tandem.updates")
CHANNEL = "tandem_updates"
_PUBLISH_LOCK = 0x7570646174  # "updat": serialises id assignment with commit


class PostgresUpdateRegistry(UpdateRegistry):
    """Updates shared by every gateway and trainer of one cloud."""

    def __init__(self, db: PostgresDatabase, blobs: BlobStore, signing_key: Ed25519PrivateKey) -> None:
        self.db = db
        self.blobs = blobs
        self._key = signing_key
        self._listeners: list[_Listener] = []

    def _store(self, up: UpdateRecord, payload: bytes, job_id: int) -> UpdateRecord:
        blob_key = f"updates/{up.sha256_hex}"
        if not (self.blobs.exists(blob_key) and self.blobs.size(blob_key) == up.size):
            self.blobs.put(blob_key, payload)
        with self.db.transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PUBLISH_LOCK,))
            cur.execute(
                "INSERT INTO updates (device_id, cohort, base_version, target_version, sha256, size, metadata,"
                " created_unix_ms, signature, key_id, payload_info, blob_key, job_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING update_id",
                (
                    up.device_id,
                    up.cohort,
                    up.base_version,
                    up.target_version,
                    up.sha256_hex,
                    up.size,
                    Jsonb(up.metadata),
                    up.created_unix_ms,
                    up.signature,
                    up.key_id,
                    up.payload_info,
                    blob_key,
                    job_id,
                ),
            )
            row = cur.fetchone()
            assert row is not None
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(row[0])))
        return dataclasses.replace(up, update_id=int(row[0]))

    def _select(self, where: str, args: tuple) -> list[UpdateRecord]:
        with self.db.cursor() as cur:
            cur.execute(f"SELECT {UPDATE_COLUMNS} FROM updates WHERE {where} ORDER BY update_id", args)
            return [_record(r) for r in cur.fetchall()]

    def get(self, update_id: int) -> UpdateRecord | None:
        rows = self._select("update_id = %s", (update_id,))
        return rows[0] if rows else None

    def by_job(self, job_id: int) -> UpdateRecord | None:
        rows = self._select("job_id = %s AND job_id > 0", (job_id,))
        return rows[0] if rows else None

    def list(self, device_id=None, cohort=None, after_id=0) -> list[UpdateRecord]:
        where, args = "update_id > %s", [after_id]
        if device_id is not None:
            where += " AND device_id = %s"
            args.append(device_id)
        if cohort is not None:
            where += " AND cohort = %s"
            args.append(cohort)
        return self._select(where, tuple(args))

    def for_device(self, device_id: str, cohort: str, after_id: int = 0) -> list[UpdateRecord]:
        return self._select(
            "update_id > %s AND (device_id = %s OR (cohort <> '' AND cohort = %s))", (after_id, device_id, cohort)
        )

    def read_payload(self, update_id: int, offset: int, length: int) -> bytes:
        with self.db.cursor() as cur:
            cur.execute("SELECT blob_key FROM updates WHERE update_id = %s", (update_id,))
            row = cur.fetchone()
        if row is None:
            raise KeyError(update_id)
        return self.blobs.get(row[0], offset, length)

    def latest_id(self) -> int:
        with self.db.cursor() as cur:
            cur.execute("SELECT MAX(update_id) FROM updates")
            row = cur.fetchone()
        return int(row[0] or 0) if row else 0

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        listener = _Listener(self.db.dsn, callback)
        listener.start()
        self._listeners.append(listener)
        return listener.stop

    def close(self) -> None:
        for listener in self._listeners:
            listener.stop()
        self._listeners.clear()
        self.db.close()
        self.blobs.close()


class _Listener:
    """A thread on its own connection that LISTENs and calls back on every publish (and after reconnecting)."""

    def __init__(self, dsn: str, callback: Callable[[], None]) -> None:
        self._dsn = dsn
        self._callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="updates-listen", daemon=True)
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self.ready.wait(10)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = connect_postgres(self._dsn, "tandem-listen")
            except Exception as exc:  # the database is down: watchers keep polling; retry
                log.warning("LISTEN connection failed (%s); retrying", exc)
                self._stop.wait(1.0)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                self.ready.set()
                self._callback()  # something may have been published while we were not listening
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=0.5):
                        self._callback()
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                self._stop.wait(0.5)
            finally:
                conn.close()


def _record(row: tuple) -> UpdateRecord:
    return record_from_row(row, lambda value: value)  # JSONB arrives parsed
