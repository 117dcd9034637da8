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


@dataclass(frozen=True)
class Committed:
    """What one durable ``commit`` did: per sample whether it was new, and the high-water of each device in it."""

    new: list[bool]
    high_water: dict[str, int]


@dataclass(frozen=True)
class PendingStats:
    """Samples of one device after a seq: how many, their payload bytes and the highest seq among them."""

    count: int
    bytes: int
    upto_seq: int


class SampleStore(ABC):
    """Durable storage of device samples. Writing a (device_id, seq) that exists is a no-op."""

    concurrent_reads: bool = False
    """True when reads may run on any thread while a ``put`` is in progress (the gateway's writer then keeps
    its one thread for commits)."""

    def put(self, samples: Sequence[Sample]) -> list[bool]:
        """Store ``samples`` in one durable transaction; per sample, True if new, False if already stored."""
        return self.commit(samples).new

    @abstractmethod
    def commit(self, samples: Sequence[Sample]) -> Committed:
        """``put``, also returning the high-water of every device in ``samples`` as of this commit (what the
        gateway acks, without another round trip)."""

    @abstractmethod
    def pending_stats(self, device_id: str, after_seq: int, limit: int) -> PendingStats:
        """Count, payload bytes and highest seq of the first ``limit`` samples after ``after_seq`` (no payload
        is read: the scheduler's view)."""

    @abstractmethod
    def high_water(self, device_id: str) -> int:
        """Highest seq stored for ``device_id`` (0 when none)."""

    def high_waters(self) -> dict[str, int]:
        """Every device's ``high_water`` (devices with no sample are absent); stores override it with one read."""
        return {d: self.high_water(d) for d in self.devices()}

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
