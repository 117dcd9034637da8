"""The payload blob interface: named byte strings, durable once ``put`` returns, readable by byte range."""

from __future__ import annotations

import re
import time
import uuid
from abc import ABC, abstractmethod

from common.errors import TandemError

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


class BlobError(TandemError):
    """A blob store is unreachable, misconfigured, or refused an operation."""


class BlobNotFound(BlobError, KeyError):
    """No blob has this key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "blob not found"


def check_key(key: str) -> str:
    """``key`` if it is a safe relative name (``a/b.c``, no ``..``, no leading slash), else BlobError."""
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")) or len(key) > 512:
        raise BlobError(f"invalid blob key {key!r}: use 1-512 chars of [A-Za-z0-9._-] separated by '/'")
    return key


class BlobStore(ABC):
    """Blobs shared by every gateway and trainer of one cloud: a directory on a shared volume, or S3."""

    def new_key(self, prefix: str) -> str:
        """A fresh key under ``prefix`` (``<prefix>/<UTC hour>/<uuid>``) for a blob written once; a store may
        have prepared it in advance to make that ``put`` cheaper."""
        return f"{check_key(prefix)}/{time.strftime('%Y%m%d%H', time.gmtime())}/{uuid.uuid4().hex}"

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; returns only once the bytes are durable. Overwrites an existing key."""

    @abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Up to ``length`` bytes from ``offset`` (all to the end when None); BlobNotFound for a missing key."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Length of the blob in bytes; BlobNotFound for a missing key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if a blob has this key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob (a missing key is not an error)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources."""
