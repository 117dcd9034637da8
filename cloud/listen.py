"""PostgreSQL LISTEN: the dialect hook that tells one process what another committed (published updates, changed
device tokens)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cloud.db import connect_postgres

log = logging.getLogger("tandem.sql")


class Listener:
    """A thread on its own connection that LISTENs on ``channel`` and calls back on every notification (and once
    after each (re)connection, since notifications sent while it was not listening are lost).

    ``live`` is set while the connection listens and cleared as soon as the thread sees it fail, so a cache that
    relies on the notifications can stop trusting itself until the next callback.
    """

    def __init__(self, dsn: str, channel: str, callback: Callable[[], None], poll_s: float = 0.5) -> None:
        self._dsn = dsn
        self._channel = channel
        self._callback = callback
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{channel}", daemon=True)
        self.ready = threading.Event()
        self.live = threading.Event()

    def start(self) -> None:
        """Start listening; waits up to 10 s for the first LISTEN."""
        self._thread.start()
        self.ready.wait(10)

    def stop(self) -> None:
        """Stop and join the thread."""
        self._stop.set()
        self.live.clear()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = connect_postgres(self._dsn, "tandem-listen")
            except Exception as exc:  # the database is down: callers fall back (poll, or skip their cache); retry
                log.warning("LISTEN connection failed (%s); retrying", exc)
                self._stop.wait(1.0)
                continue
            try:
                conn.execute(f"LISTEN {self._channel}")
                self.live.set()
                self.ready.set()
                self._callback()  # something may have been sent while we were not listening
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=self._poll_s):
                        self._callback()
            except Exception as exc:
                self.live.clear()
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                self._stop.wait(0.5)
            finally:
                self.live.clear()
                conn.close()
