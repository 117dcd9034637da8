"""Record what a store does to the filesystem (creates, writes, renames, fsyncs) and check the order a power cut
needs, as the stores' docs promise: what a name points to is synced before the name, and a call returns only when
everything it wrote is on disk.

Model: after a power cut a file keeps only the data last fsynced, and a directory only the entries (creates,
renames) it held at its last fsync. Three rules follow:

- A: a rename's source is synced first (a file's data, a directory's entries), or the new name can point at
  missing data.
- B: when a store call returns, nothing it wrote is unsynced (data or directory entries).
- C: a rename onto a *commit point* (the name readers start from: ``HEAD.json``, ``current.json``, ...) happens
  while nothing but its own temporary name is unsynced: every file and directory entry it may refer to is on disk
  before it (entries of one directory are not ordered among themselves without an fsync either).

Python's audit hooks report ``open`` (with its flags), ``os.rename`` (also raised by ``os.replace``) and
``os.mkdir``; ``os.fsync`` is wrapped; files written by safetensors' Rust code are reported by wrapping the
``save_file`` a module imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import pytest

_WRITE = os.O_WRONLY | os.O_RDWR
_ACTIVE: list[FsTrace] = []


def _audit(event: str, args: tuple) -> None:
    if _ACTIVE:
        _ACTIVE[-1].on_audit(event, args)


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one does nothing while no trace is active


class FsTrace:
    """The filesystem events under ``root`` while active, and the rules above checked over them."""

    def __init__(self, root: Path, commit_points: Iterable[str] = ()) -> None:
        self.root = Path(os.path.realpath(root))
        self.commit_points = set(commit_points)
        self.events: list[tuple[str, ...]] = []

    def _inside(self, path) -> Path | None:
        if isinstance(path, int):
            return None
        p = Path(os.path.realpath(os.fsdecode(path)))
        return p if p == self.root or self.root in p.parents else None

    def on_audit(self, event: str, args: tuple) -> None:
        if event == "open" and (p := self._inside(args[0])) is not None:
            flags = args[2]
            if flags & os.O_EXCL and p.exists():
                return  # this open fails: nothing is written
            if flags & os.O_CREAT and not p.exists():
                self.events.append(("create", str(p)))
            if flags & _WRITE:
                self.events.append(("write", str(p)))
        elif event == "os.mkdir" and (p := self._inside(args[0])) is not None:
            self.events.append(("mkdir", str(p)))
        elif event == "os.rename":
            src, dst = self._inside(args[0]), self._inside(args[1])
            if src is not None and dst is not None:
                self.events.append(("rename", str(src), str(dst)))

    def on_fsync(self, fd: int) -> None:
        p = self._inside(os.readlink(f"/proc/self/fd/{fd}"))
        if p is not None:
            self.events.append(("fsync", str(p)))

    def on_rust_write(self, path) -> None:
        p = self._inside(path)
        if p is not None:
            if not p.exists():
                self.events.append(("create", str(p)))
            self.events.append(("write", str(p)))

    def violations(self) -> list[str]:
        """Rule A and C breaches in order, then rule B's leftovers at the end of the trace."""
        data: set[str] = set()  # files with unsynced data
        names: set[str] = set()  # directory entries (created, renamed from or to) not yet synced in their parent
        found = []
        for ev in self.events:
            kind, path = ev[0], ev[1]
            if kind in ("create", "mkdir"):
                names.add(path)
                if kind == "create":
                    data.add(path)
            elif kind == "write":
                data.add(path)
            elif kind == "fsync":
                data.discard(path)
                names -= {n for n in names if str(Path(n).parent) == path}
            elif kind == "rename":
                dst = ev[2]
                inside = {p for p in data | names if p == path and p in data or p.startswith(path + "/")}
                if inside:
                    found.append(f"A: {_rel(path, self.root)} renamed with {_rels(inside, self.root)} unsynced")
                if Path(dst).name in self.commit_points:
                    others = (data | names) - {path}
                    if others:
                        unsynced = _rels(others, self.root)
                        found.append(f"C: commit point {_rel(dst, self.root)} set with {unsynced} unsynced")
                data.discard(path)
                names.update({path, dst})
        if data or names:
            found.append(f"B: returned with {_rels(data | names, self.root)} unsynced")
        return found


def _rel(path: str, root: Path) -> str:
    return os.path.relpath(path, root)


def _rels(paths: Iterable[str], root: Path) -> str:
    return ", ".join(sorted(_rel(p, root) for p in paths))


@contextmanager
def tracing(root: Path, commit_points: Iterable[str] = (), rust_writers: Iterable = ()):
    """Trace the store calls of the block under ``root``; ``rust_writers``: modules whose ``save_file`` to wrap."""
    trace = FsTrace(root, commit_points)
    real_fsync = os.fsync

    def fsync(fd):
        trace.on_fsync(fd if isinstance(fd, int) else fd.fileno())
        return real_fsync(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        for module in rust_writers:
            real_save = module.save_file

            def save_file(tensors, filename, *a, _real=real_save, **kw):
                trace.on_rust_write(filename)
                return _real(tensors, filename, *a, **kw)

            mp.setattr(module, "save_file", save_file)
        _ACTIVE.append(trace)
        try:
            yield trace
        finally:
            _ACTIVE.remove(trace)
