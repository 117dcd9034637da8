"""Where sample payload bytes live, apart from their rows: segment files beside one gateway's SQLite database, or
one blob per group commit in the blob store every gateway shares.

A payload store writes a batch durably and names it (a key and each payload's offset) before any row refers to
it, so a committed row always points at durable bytes. Bytes nobody refers to (a resend, a crash between the
write and the commit: never acked) may stay behind unreferenced.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from cloud.blobs import BlobStore

SEGMENT_BYTES = 256 * 1024 * 1024


class PayloadStore(ABC):
    """Batches of payloads, written once and read by byte range."""

    @abstractmethod
    def write(self, payloads: Sequence[bytes]) -> tuple[str, list[int]]:
        """Store ``payloads`` durably, one after another; returns their key and each one's offset."""

    @abstractmethod
    def read(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of ``key`` (fewer if it is shorter)."""

    def discard(self, key: str) -> None:  # noqa: B027 (optional hook)
        """Nothing refers to the batch ``write`` just named (every sample in it was stored before)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources."""


class SegmentPayloads(PayloadStore):
    """Payloads appended to ``<directory>/<n>.seg`` (``n`` zero-padded, the key its number), fsynced when
    ``fsync``; a new segment after ``segment_bytes``. Appending each payload once, sequentially, is several times
    faster than SQLite overflow pages plus WAL checkpoint copies."""

    def __init__(self, directory: str | Path, fsync: bool = True, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        existing = sorted(int(p.stem) for p in self.directory.glob("*.seg"))
        self._segment = existing[-1] if existing else 0
        self._writer = open(self._path(self._segment), "ab")  # noqa: SIM115 (kept open, closed in close())
        self._readers: dict[int, int] = {}

    def _path(self, n: int) -> Path:
        return self.directory / f"{n:06d}.seg"

    def write(self, payloads: Sequence[bytes]) -> tuple[str, list[int]]:
        with self._lock:
            if self._writer.tell() >= self.segment_bytes:
                self._writer.close()
                self._segment += 1
                self._writer = open(self._path(self._segment), "ab")  # noqa: SIM115
            offsets = []
            for payload in payloads:
                offsets.append(self._writer.tell())
                self._writer.write(payload)
            self._writer.flush()
            if self.fsync:
                os.fsync(self._writer.fileno())
            return str(self._segment), offsets

    def read(self, key: str, offset: int, length: int) -> bytes:
        segment = int(key)
        with self._lock:
            fd = self._readers.get(segment)
            if fd is None:
                fd = self._readers[segment] = os.open(self._path(segment), os.O_RDONLY)
        return os.pread(fd, length, offset)

    def close(self) -> None:
        with self._lock:
            self._writer.close()
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()


class BlobPayloads(PayloadStore):
    """One blob per batch (``samples/<hour>/<uuid>``) in a shared blob store; a batch nobody refers to is deleted."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def write(self, payloads: Sequence[bytes]) -> tuple[str, list[int]]:
        key = self.blobs.new_key("samples")
        offsets, pos = [], 0
        for payload in payloads:
            offsets.append(pos)
            pos += len(payload)
        self.blobs.put(key, b"".join(payloads))
        return key, offsets

    def read(self, key: str, offset: int, length: int) -> bytes:
        return self.blobs.get(key, offset, length)

    def discard(self, key: str) -> None:
        self.blobs.delete(key)

    def close(self) -> None:
        self.blobs.close()
