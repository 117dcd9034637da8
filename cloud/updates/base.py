"""The update registry interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from cloud.updates.publishing import prepare_update
from common.signing import Ed25519PrivateKey
from protocol.tandem.v1 import gateway_pb2, tensors_pb2
from protocol.updates import UpdateHeader, header_to_proto


@dataclass(frozen=True)
class UpdateRecord:
    """A published update: the signed header (the one ``UpdateHeader``), its signature and registry extras."""

    update_id: int
    header: UpdateHeader
    created_unix_ms: int = 0
    signature: bytes = b""
    key_id: str = ""
    payload_info: bytes = b""
    """Serialised ``tandem.v1.PayloadInfo`` (format, size, digest, tensor list)."""

    @property
    def device_id(self) -> str:
        return self.header.device_id

    @property
    def cohort(self) -> str:
        return self.header.cohort

    @property
    def base_version(self) -> str:
        return self.header.base_version

    @property
    def target_version(self) -> str:
        return self.header.target_version

    @property
    def sha256_hex(self) -> str:
        return self.header.sha256_hex

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def to_proto(self) -> gateway_pb2.UpdateHeader:
        """Wire header."""
        return header_to_proto(
            self.header,
            update_id=self.update_id,
            payload=tensors_pb2.PayloadInfo.FromString(self.payload_info),
            signature=self.signature,
            key_id=self.key_id,
            created_unix_ms=self.created_unix_ms,
        )


class UpdateRegistry(ABC):
    """Durable store of signed updates, served in chunks."""

    _key: Ed25519PrivateKey

    def publish(
        self,
        device_id: str,
        base_version: str,
        target_version: str,
        payload: bytes,
        metadata: dict[str, str] | None = None,
    ) -> UpdateRecord:
        """Sign and store an update for one device; returns its record."""
        return self.publish_header(_unsigned(device_id or "", "", base_version, target_version, metadata), payload)

    def publish_cohort(
        self,
        cohort: str,
        base_version: str,
        target_version: str,
        payload: bytes,
        metadata: dict[str, str] | None = None,
    ) -> UpdateRecord:
        """Sign and store an update for every device of ``cohort``."""
        return self.publish_header(_unsigned("", cohort or "", base_version, target_version, metadata), payload)

    def publish_header(self, header: UpdateHeader, payload: bytes, job_id: int = 0) -> UpdateRecord:
        """Sign and store ``header`` (as the DWC step built it; its digest and size must describe ``payload``) for
        its device or cohort; ``job_id`` > 0 names the job that made it (see ``by_job``)."""
        return self._store(prepare_update(self._key, header, payload), payload, job_id)

    @abstractmethod
    def _store(self, record: UpdateRecord, payload: bytes, job_id: int) -> UpdateRecord:
        """Store a signed record (``update_id`` 0) and its payload; returns it numbered."""

    @abstractmethod
    def by_job(self, job_id: int) -> UpdateRecord | None:
        """The update published for ``job_id`` (an indexed lookup: publishing a job twice is a no-op), or None."""

    @abstractmethod
    def get(self, update_id: int) -> UpdateRecord | None:
        """The update with this id, or None."""

    @abstractmethod
    def list(self, device_id: str | None = None, cohort: str | None = None, after_id: int = 0) -> list[UpdateRecord]:
        """Updates in id order, optionally filtered by device or cohort."""

    @abstractmethod
    def for_device(self, device_id: str, cohort: str, after_id: int = 0) -> list[UpdateRecord]:
        """Updates addressed to ``device_id`` or to its ``cohort``, with id > ``after_id``, in id order."""

    def latest_for_device(self, device_id: str, cohort: str) -> int:
        """Highest id of an update addressed to ``device_id`` or its ``cohort`` (0 when none): what a heartbeat
        reports, without reading the records."""
        return max((r.update_id for r in self.for_device(device_id, cohort)), default=0)

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


def _unsigned(device_id: str, cohort: str, base: str, target: str, metadata: dict | None) -> UpdateHeader:
    """A header whose digest and size ``prepare_update`` fills in from the payload."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return UpdateHeader(device_id, cohort, base, target, "", -1, meta)


def record_from_row(row: tuple) -> UpdateRecord:
    """An update from a row of ``cloud.sql.updates`` (update_id, device_id, cohort, base_version, target_version,
    sha256, size, metadata parsed, created_unix_ms, signature, key_id, payload_info)."""
    header = UpdateHeader(row[1], row[2], row[3], row[4], row[5], int(row[6]), dict(row[7]))
    return UpdateRecord(
        update_id=int(row[0]),
        header=header,
        created_unix_ms=int(row[8]),
        signature=bytes(row[9]),
        key_id=row[10],
        payload_info=bytes(row[11]),
    )
