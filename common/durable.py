"""Writing files that survive a crash: fsync the bytes, rename into place, fsync the directory entry."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a created, renamed or removed name) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the directory entry is the caller's to flush)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old bytes or the new, and the new survive a crash."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_dirs(path: str | Path) -> None:
    """``mkdir -p`` whose new directories survive a crash: each created entry is flushed in its parent."""
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.is_dir()][::-1]
    for d in missing:
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)
