"""Token → device on the gateway's event loop: a cache of live tokens that every change to a token empties.

Every call authenticates, so the lookup is on the hot path of the front door. A hit costs a hash and a dict
lookup, no thread hop and no round trip; a miss asks the registry on a worker thread and keeps the answer only
if nothing changed meanwhile. Unknown tokens are never cached (a re-registration may make them valid).

The cache is emptied after every committed change to a token or cohort (register, revoke, provision, set_cohort):

- in this process, by the registry itself, after the commit and before the call returns;
- from other processes (the operator's CLI, the other gateways), by the registry's :class:`TokenWatch`:
  on SQLite, ``PRAGMA data_version`` on a connection of the watch's own, checked on every lookup (memory only),
  and the registry's token epoch (one row, read only when another connection committed something); on
  PostgreSQL, ``NOTIFY tandem_devices`` from the changing transaction. While the LISTEN connection is down the
  cache serves nothing and every call asks the database.

The cached records are as of their lookup: identity, cohort and model are current, status fields
(``applied_version``, ``last_seen_unix_ms``, metrics) are not meant to be read from them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cloud.devices import DeviceRecord, Devices

CHANNEL = "tandem_devices"
MAX_ENTRIES = 1 << 17


class TokenWatch(Protocol):
    """Tells a cache whether it may still trust what it holds (and calls it back when it may not)."""

    def current(self) -> bool:
        """False when a token may have changed since the last call (the cache then empties itself)."""
        ...

    def live(self) -> bool:
        """True while the watch sees every change (a cache holds nothing while it is False)."""
        ...

    def close(self) -> None:
        """Stop watching."""
        ...


class SqliteTokenWatch:
    """Another process's committed token change, seen on a read-only connection of this watch's own."""

    def __init__(self, path: str | Path) -> None:
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        self._version = -1
        self._epoch = -1
        self.current()  # the state the (empty) cache starts from

    def current(self) -> bool:
        with self._lock:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version:
                return True
            self._version = version  # someone committed: was it a token change, or a heartbeat?
            epoch = self._conn.execute("SELECT epoch FROM device_epoch").fetchone()[0]
            changed, self._epoch = epoch != self._epoch, epoch
            return not changed

    def live(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class ListenTokenWatch:
    """PostgreSQL: the registry's ``NOTIFY`` from any process; untrusted while the LISTEN connection is down."""

    def __init__(self, dsn: str, on_change: Callable[[], None]) -> None:
        from cloud.listen import Listener

        self._listener = Listener(dsn, CHANNEL, on_change)
        self._listener.start()

    def current(self) -> bool:
        return self._listener.live.is_set()

    def live(self) -> bool:
        return self._listener.live.is_set()

    def close(self) -> None:
        self._listener.stop()


class TokenCache:
    """Live devices by token, for one event loop (see the module docstring for when it is emptied)."""

    def __init__(self, devices: Devices, max_entries: int = MAX_ENTRIES) -> None:
        self._devices = devices
        self._max = max_entries
        self._entries: dict[str, DeviceRecord] = {}
        self._generation = 0
        self._watch: TokenWatch | None = devices.watch_tokens(self.flush)

    def flush(self) -> None:
        """Forget every token (thread-safe: called from the registry's and the watch's threads)."""
        self._generation += 1
        self._entries = {}

    def _trusted(self) -> bool:
        """Whether entries may be served and stored now (empties the cache first if a token changed)."""
        watch = self._watch
        if watch is None:
            return False
        if not watch.current():
            self.flush()
        return watch.live()

    async def authenticate(self, token: str) -> DeviceRecord | None:
        """The live device holding ``token``, or None (a miss asks the registry on a worker thread)."""
        from cloud.devices import token_hash

        key = token_hash(token)
        trusted = self._trusted()
        if trusted and (hit := self._entries.get(key)) is not None:
            return hit
        generation = self._generation
        record = await asyncio.to_thread(self._devices.authenticate, token)
        if record is not None and trusted and self._trusted() and generation == self._generation:
            entries = self._entries
            if len(entries) >= self._max:
                self.flush()
                entries = self._entries
            entries[key] = record
        return record

    def close(self) -> None:
        """Stop watching for changes."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self.flush()
