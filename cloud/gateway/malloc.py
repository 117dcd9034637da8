"""Keep the gateway's resident memory near what it uses: glibc's mmap threshold pinned.

glibc raises its mmap threshold each time a large block is freed, after which chunk-sized buffers come from
the heap; freed heap memory between live blocks stays resident. Uploads allocate and free many chunk-sized
buffers on several threads, so without this the process keeps growing towards its peak and never shrinks.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def pin_malloc_thresholds(mmap_threshold: int = 128 * 1024) -> bool:
    """Serve blocks from ``mmap_threshold`` up by mmap (returned on free); True when applied (glibc only)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold)
    )
