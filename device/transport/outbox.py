"""Durable outbox (SQLite, WAL): samples wait here until the cloud acks them; seqs are never reused."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common import clock as clocks
from common.codec import sha256_digest
from common.errors import TandemError
from common.sample_codec import check_sample
from common.tensor_pack import PayloadError
from protocol.limits import MAX_METADATA_ENTRIES, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL,
    metadata TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    sha256 BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    metadata TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    reason TEXT NOT NULL,
    rejected_unix_ms INTEGER NOT NULL
);
"""


class OutboxError(TandemError):
    """A sample cannot be queued (too large, bad metadata, not a valid sample)."""


@dataclass(frozen=True)
class QuarantinedItem:
    """A sample the cloud refused for good, kept aside with the reason."""

    seq: int
    size: int
    metadata: dict[str, str]
    created_unix_ms: int
    reason: str
    rejected_unix_ms: int


@dataclass(frozen=True)
class OutboxItem:
    """One queued sample."""

    seq: int
    payload: bytes
    metadata: dict[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0
    sha256: bytes = b""
    """Digest computed once at ``put`` (empty: compute when sending)."""


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox holds."""

    pending: int
    pending_bytes: int
    first_seq: int | None
    last_seq: int | None
    acked_seq: int
    next_seq: int
    rejected: int = 0
    """Samples the cloud refused for their content, kept aside in the ``rejected`` table."""


def _check_metadata(meta: dict[str, str]) -> None:
    """Refuse metadata the gateway would refuse, before it is queued (it could never be delivered)."""
    if len(meta) > MAX_METADATA_ENTRIES:
        raise OutboxError(f"more than {MAX_METADATA_ENTRIES} metadata entries")
    for key, value in meta.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise OutboxError(f"metadata key must be 1-{MAX_METADATA_KEY_CHARS} chars: {key[:40]!r}")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise OutboxError(f"metadata value of {key!r} exceeds {MAX_METADATA_VALUE_CHARS} chars")


def _seq_filter(seqs: list[int] | None) -> tuple[str, tuple[int, ...]]:
    if seqs is None:
        return "", ()
    return f"WHERE seq IN ({','.join('?' * len(seqs))})", tuple(seqs)


class Outbox:
    """Samples in seq order; ``ack(n)`` deletes every seq <= n, nothing else ever deletes."""

    def __init__(self, path: str | Path, max_sample_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_sample_bytes = max_sample_bytes
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA page_size=65536")  # fewer overflow pages for MiB-sized samples (new files)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def put(self, payload: bytes, metadata: Mapping[str, str] | None = None) -> int:
        """Queue one sample durably; returns its seq."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise OutboxError(f"payload must be bytes, got {type(payload).__name__}")
        if self.max_sample_bytes is not None and len(payload) > self.max_sample_bytes:
            raise OutboxError(f"sample of {len(payload)} bytes exceeds max_sample_bytes {self.max_sample_bytes}")
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        _check_metadata(meta)
        try:
            check_sample(bytes(payload))  # the gateway's own check: what fails it could never be delivered
        except PayloadError as exc:
            raise OutboxError(f"not a valid sample: {exc}") from None
        digest = sha256_digest(payload)
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO outbox (payload, metadata, created_unix_ms, sha256) VALUES (?, ?, ?, ?)",
                (bytes(payload), json.dumps(meta, sort_keys=True), clocks.current().now_ms(), digest),
            )
            seq = int(cur.lastrowid or 0)
        return seq

    def pending(self, max_samples: int = 64, max_bytes: int = 16 * 1024 * 1024, after_seq: int = 0) -> list[OutboxItem]:
        """Oldest unacked samples in seq order (at least one even when it alone exceeds ``max_bytes``)."""
        items: list[OutboxItem] = []
        total = 0
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, length(payload) FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, max_samples),
            ).fetchall()
            chosen = []
            for seq, size in rows:
                if chosen and total + size > max_bytes:
                    break
                chosen.append(seq)
                total += size
            for seq in chosen:
                row = self._conn.execute(
                    "SELECT payload, metadata, created_unix_ms, sha256 FROM outbox WHERE seq = ?", (seq,)
                ).fetchone()
                items.append(OutboxItem(int(seq), bytes(row[0]), json.loads(row[1]), int(row[2]), bytes(row[3])))
        return items

    def ack(self, upto_seq: int) -> int:
        """Delete samples with seq <= ``upto_seq`` (acked by the cloud); returns how many were deleted."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            cur = self._conn.execute("DELETE FROM outbox WHERE seq <= ?", (upto_seq,))
            self._conn.execute(
                "INSERT INTO outbox_state (key, value) VALUES ('acked_seq', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                (upto_seq,),
            )
            self._conn.execute("COMMIT")
        return cur.rowcount

    def quarantine(self, seq: int, reason: str) -> bool:
        """Move a sample the cloud refused for good out of the queue (kept, with the reason, for inspection)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO rejected SELECT seq, payload, metadata, created_unix_ms, sha256, ?, ?"
                " FROM outbox WHERE seq = ?",
                (reason, clocks.current().now_ms(), seq),
            )
            self._conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._conn.execute("COMMIT")
        return cur.rowcount == 1

    def rejected(self) -> list[tuple[int, str]]:
        """``(seq, reason)`` of every quarantined sample."""
        return [(q.seq, q.reason) for q in self.quarantined()]

    def quarantined(self, seqs: list[int] | None = None) -> list[QuarantinedItem]:
        """Quarantined samples (all, or those of ``seqs``) in seq order, without their payloads."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, length(payload), metadata, created_unix_ms, reason, rejected_unix_ms FROM rejected"
                " ORDER BY seq"
            ).fetchall()
        wanted = None if seqs is None else set(seqs)
        return [
            QuarantinedItem(int(r[0]), int(r[1]), json.loads(r[2]), int(r[3]), str(r[4]), int(r[5]))
            for r in rows
            if wanted is None or int(r[0]) in wanted
        ]

    def quarantined_payload(self, seq: int) -> bytes | None:
        """The bytes of one quarantined sample, or None."""
        with self._lock:
            row = self._conn.execute("SELECT payload FROM rejected WHERE seq = ?", (seq,)).fetchone()
        return bytes(row[0]) if row else None

    def requeue(self, seqs: list[int] | None = None) -> int:
        """Put quarantined samples (all, or ``seqs``) back in the queue under their own seq; returns how many."""
        where, args = _seq_filter(seqs)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO outbox (seq, payload, metadata, created_unix_ms, sha256)"
                f" SELECT seq, payload, metadata, created_unix_ms, sha256 FROM rejected {where}",
                args,
            )
            moved = cur.rowcount
            queued = "seq IN (SELECT seq FROM outbox)"  # only what is safely back in the queue leaves quarantine
            self._conn.execute(f"DELETE FROM rejected {where + ' AND ' if where else 'WHERE '}{queued}", args)
            self._conn.execute("COMMIT")
        return moved

    def purge(self, seqs: list[int] | None = None) -> int:
        """Delete quarantined samples (all, or ``seqs``) for good; returns how many."""
        where, args = _seq_filter(seqs)
        with self._lock:
            cur = self._conn.execute(f"DELETE FROM rejected {where}", args)
        return cur.rowcount

    def delete(self, seqs: list[int]) -> int:
        """Delete the given samples (all durably stored by the cloud); returns how many were deleted."""
        if not seqs:
            return 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            cur = self._conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
            deleted = cur.rowcount
            self._conn.execute(
                "INSERT INTO outbox_state (key, value) VALUES ('acked_seq', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                (max(seqs),),
            )
            self._conn.execute("COMMIT")
        return deleted

    def ensure_seq_above(self, seq: int) -> None:
        """Make future seqs larger than ``seq`` (the cloud already holds samples up to it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (seq,))
            elif row[0] < seq:
                self._conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (seq,))
            self._conn.execute("COMMIT")

    def stats(self) -> OutboxStats:
        """Counts, byte total and seq range."""
        with self._lock:
            n, size, lo, hi = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0), MIN(seq), MAX(seq) FROM outbox"
            ).fetchone()
            acked = self._conn.execute("SELECT value FROM outbox_state WHERE key = 'acked_seq'").fetchone()
            last = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            (rejected,) = self._conn.execute("SELECT COUNT(*) FROM rejected").fetchone()
        return OutboxStats(
            int(n),
            int(size),
            lo,
            hi,
            int(acked[0]) if acked else 0,
            (int(last[0]) if last else 0) + 1,
            int(rejected),
        )

    def close(self) -> None:
        """Release the database."""
        with self._lock:
            self._conn.close()
