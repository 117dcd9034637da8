"""The sample store interface: durable, idempotent by (device_id, seq)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One uploaded sample: opaque payload bytes (safetensors from the learning core) plus small metadata."""

    device_id: str
    seq: int
    payload: bytes
    metadata: dict[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0
    received_unix_ms: int = 0


class SampleStore(ABC):
    """Durable storage of device samples. Writing a (device_id, seq) that exists is a no-op."""

    concurrent_reads: bool = False
    """True when reads may run on any thread while a ``put`` is in progress (the gateway's writer then keeps
    its one thread for commits)."""

    @abstractmethod
    def put(self, samples: Sequence[Sample]) -> list[bool]:
        """Store ``samples`` in one durable transaction; per sample, True if new, False if already stored."""

    @abstractmethod
    def high_water(self, device_id: str) -> int:
        """Highest seq stored for ``device_id`` (0 when none)."""

    @abstractmethod
    def iter_samples(self, device_id: str, after_seq: int = 0, limit: int | None = None) -> Iterator[Sample]:
        """Samples of ``device_id`` with seq > ``after_seq`` in seq order."""

    @abstractmethod
    def count(self, device_id: str | None = None) -> int:
        """Number of stored samples, for one device or all."""

    @abstractmethod
    def devices(self) -> list[str]:
        """Device ids that have samples."""

    @abstractmethod
    def close(self) -> None:
        """Release resources."""
