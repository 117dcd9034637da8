"""Queue chosen samples into the durable outbox from a thread of its own, so the fsync of each write stays off the
request path. A sample counts as queued once written (its seq assigned); ``close`` writes what is still waiting."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from device.transport.outbox import Outbox

log = logging.getLogger("tandem.device.outbox")
_STOP = object()


class OutboxWriter:
    """``put(payload, metadata)`` returns at once; a writer thread calls ``Outbox.put`` in order."""

    def __init__(self, outbox: Outbox, max_waiting: int = 1024) -> None:
        self.outbox = outbox
        self._queue: queue.Queue = queue.Queue(maxsize=max_waiting)
        self.written = 0
        self.writing = False
        """True while a sample is being written (with ``waiting``: the host still has work here)."""
        self.dropped = 0
        # Called on the writer thread with (seq, payload, metadata) once a sample is durably queued.
        self.on_written: Callable[[int, bytes, dict[str, str]], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="tandem-outbox", daemon=True)
        self._thread.start()

    def put(self, payload: bytes, metadata: dict[str, str]) -> None:
        """Hand a sample to the writer; when it is ``max_waiting`` behind, the sample is dropped and counted."""
        try:
            self._queue.put_nowait((payload, metadata))
        except queue.Full:
            self.dropped += 1
            log.warning("outbox writer is %d samples behind; sample dropped", self._queue.maxsize)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self.writing = True
            try:
                self._write(item)
            finally:
                self.writing = False

    def _write(self, item: tuple[bytes, dict[str, str]]) -> None:
        try:
            seq = self.outbox.put(*item)
            self.written += 1
        except Exception:  # a sample the outbox refuses (too large, bad metadata) never stops the writer
            log.exception("outbox refused a sample")
            return
        if self.on_written is not None:
            self.on_written(seq, *item)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything still waiting, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
