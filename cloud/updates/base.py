"""The update registry interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.tandem.v1 import gateway_pb2, tensors_pb2
from protocol.updates import UpdateHeader, header_to_proto

# The update row's columns, in the order both registries select them.
UPDATE_COLUMNS = (
    "update_id, device_id, cohort, base_version, target_version, sha256, size, metadata, created_unix_ms,"
    " signature, key_id, payload_info"
)


@dataclass(frozen=True)
class UpdateRecord:
    """A published update: its signed header fields, signature and where its payload lives."""

    update_id: int
    device_id: str
    cohort: str
    base_version: str
    target_version: str
    sha256_hex: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0
    signature: bytes = b""
    key_id: str = ""
    payload_info: bytes = b""
    """Serialised ``tandem.v1.PayloadInfo`` (format, size, digest, tensor list)."""

    def header(self) -> UpdateHeader:
        """The signed part of the header."""
        return UpdateHeader(
            device_id=self.device_id,
            cohort=self.cohort,
            base_version=self.base_version,
            target_version=self.target_version,
            sha256_hex=self.sha256_hex,
            size=self.size,
            metadata=dict(self.metadata),
        )

    def to_proto(self) -> gateway_pb2.UpdateHeader:
        """Wire header."""
        return header_to_proto(
            self.header(),
            update_id=self.update_id,
            payload=tensors_pb2.PayloadInfo.FromString(self.payload_info),
            signature=self.signature,
            key_id=self.key_id,
            created_unix_ms=self.created_unix_ms,
        )


class UpdateRegistry(ABC):
    """Durable store of signed updates, served in chunks."""

    def publish(
        self,
        device_id: str,
        base_version: str,
        target_version: str,
        payload: bytes,
        metadata: dict[str, str] | None = None,
    ) -> UpdateRecord:
        """Sign and store an update for one device; returns its record."""
        return self._publish(device_id or "", "", base_version, target_version, payload, metadata)

    def publish_cohort(
        self,
        cohort: str,
        base_version: str,
        target_version: str,
        payload: bytes,
        metadata: dict[str, str] | None = None,
    ) -> UpdateRecord:
        """Sign and store an update for every device of ``cohort``."""
        return self._publish("", cohort or "", base_version, target_version, payload, metadata)

    @abstractmethod
    def _publish(
        self, device_id: str, cohort: str, base: str, target: str, payload: bytes, metadata: dict | None
    ) -> UpdateRecord:
        """Sign and store an update for a device (``cohort`` empty) or a cohort (``device_id`` empty)."""

    @abstractmethod
    def get(self, update_id: int) -> UpdateRecord | None:
        """The update with this id, or None."""

    @abstractmethod
    def list(self, device_id: str | None = None, cohort: str | None = None, after_id: int = 0) -> list[UpdateRecord]:
        """Updates in id order, optionally filtered by device or cohort."""

    @abstractmethod
    def for_device(self, device_id: str, cohort: str, after_id: int = 0) -> list[UpdateRecord]:
        """Updates addressed to ``device_id`` or to its ``cohort``, with id > ``after_id``, in id order."""

    @abstractmethod
    def read_payload(self, update_id: int, offset: int, length: int) -> bytes:
        """Up to ``length`` payload bytes of ``update_id`` from ``offset``."""

    @abstractmethod
    def latest_id(self) -> int:
        """Highest update id (0 when none)."""

    @abstractmethod
    def close(self) -> None:
        """Release resources."""

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from another thread) when any process publishes; returns the unsubscribe.

        The default does nothing: watchers find updates from other processes by polling. A shared backend
        (PostgreSQL LISTEN/NOTIFY) wakes them at once.
        """
        return lambda: None


def record_from_row(row: tuple, json_value: Callable[[Any], Any]) -> UpdateRecord:
    """An update from a row selected as ``UPDATE_COLUMNS``; ``json_value`` reads the JSON metadata column as the
    driver returns it (SQLite: text, PostgreSQL: already parsed)."""
    return UpdateRecord(
        update_id=int(row[0]),
        device_id=row[1],
        cohort=row[2],
        base_version=row[3],
        target_version=row[4],
        sha256_hex=row[5],
        size=int(row[6]),
        metadata=dict(json_value(row[7])),
        created_unix_ms=int(row[8]),
        signature=bytes(row[9]),
        key_id=row[10],
        payload_info=bytes(row[11]),
    )
