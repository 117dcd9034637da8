"""Blobs as files under one directory (a local disk, a shared volume or a Kubernetes PVC).

Each ``put`` writes a temporary file beside the target, fsyncs it, renames it into place and fsyncs the
directory, so a blob is either absent or complete, and durable once ``put`` returns.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from cloud.blobs.base import BlobNotFound, BlobStore, check_key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryBlobStore(BlobStore):
    """``<root>/<key>`` files; keys with slashes become subdirectories."""

    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = {self.root}
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self.root / check_key(key)

    def _ensure_parent(self, path: Path) -> None:
        parent = path.parent
        if parent in self._made:
            return
        missing = [p for p in [parent, *parent.parents] if p != self.root and self.root in p.parents][::-1]
        for d in missing:
            if not d.is_dir():
                d.mkdir(exist_ok=True)
                if self.fsync:
                    _fsync_dir(d.parent)  # the new directory entry itself must survive a crash
        with self._lock:
            self._made.add(parent)

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        self._ensure_parent(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(path.parent)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} not found in {self.root}") from None
        try:
            if length is None:
                length = max(os.fstat(fd).st_size - offset, 0)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} not found in {self.root}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"DirectoryBlobStore({str(self.root)!r})"
