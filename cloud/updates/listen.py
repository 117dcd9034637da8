"""PostgreSQL LISTEN: the dialect hook that wakes WatchUpdates streams when any process publishes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cloud.db import connect_postgres

log = logging.getLogger("tandem.updates")


class Listener:
    """A thread on its own connection that LISTENs and calls back on every publish (and after reconnecting)."""

    def __init__(self, dsn: str, channel: str, callback: Callable[[], None]) -> None:
        self._dsn = dsn
        self._channel = channel
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
                conn.execute(f"LISTEN {self._channel}")
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
