"""Blobs as files under one directory (a local disk, a shared volume or a Kubernetes PVC).

A new key is created exclusively and written in place; an existing key is replaced through a temporary file
and a rename, so a reader never sees a mix. Either way the file and its directory entry are fsynced before
``put`` returns. Keys from ``new_key`` name empty files created (and their directory fsynced) in batches
beforehand, so writing one costs a single fsync.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from cloud.blobs.base import BlobNotFound, BlobStore, check_key
from common.durable import fsync_dir

SPARES = 64


class DirectoryBlobStore(BlobStore):
    """``<root>/<key>`` files; keys with slashes become subdirectories."""

    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = {self.root}
        self._lock = threading.RLock()  # new_key holds it while _prepare makes directories
        self._spares: dict[str, list[str]] = {}
        self._prepared: set[str] = set()

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
                    fsync_dir(d.parent)  # the new directory entry itself must survive a crash
        with self._lock:
            self._made.add(parent)

    def new_key(self, prefix: str) -> str:
        with self._lock:
            spares = self._spares.setdefault(prefix, [])
            if not spares:
                spares.extend(self._prepare(prefix))
            key = spares.pop()
            self._prepared.add(key)
            return key

    def _prepare(self, prefix: str, n: int = SPARES) -> list[str]:
        """Create ``n`` empty files for future keys and make their directory entries durable at once."""
        keys = [super().new_key(prefix)]
        parent = keys[0].rsplit("/", 1)[0]
        keys += [f"{parent}/{uuid.uuid4().hex}" for _ in range(n - 1)]
        self._ensure_parent(self.path(keys[0]))
        for key in keys:
            os.close(os.open(self.path(key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        if self.fsync:
            fsync_dir(self.path(keys[0]).parent)
        return keys

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        with self._lock:
            prepared = key in self._prepared
            self._prepared.discard(key)
        if prepared:  # its directory entry is durable already: one fsync of the data
            self._write(os.open(path, os.O_WRONLY), path, data)
            return
        self._ensure_parent(path)
        try:  # a new key is written in place: no reader looks for it before put returns
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._replace(path, data)
            return
        self._write(fd, path, data)
        if self.fsync:
            fsync_dir(path.parent)

    def _write(self, fd: int, path: Path, data: bytes) -> None:
        try:
            with open(fd, "wb", closefd=True) as fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _replace(self, path: Path, data: bytes) -> None:
        """Overwrite an existing blob atomically: readers see the old bytes or the new, never a mix."""
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
            fsync_dir(path.parent)

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
