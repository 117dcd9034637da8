"""Update headers: the canonical bytes that the cloud signs and the device verifies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from common.signing import Ed25519PrivateKey, Ed25519PublicKey, key_id, sign, verify
from protocol.tandem.v1 import gateway_pb2, tensors_pb2

CANONICAL_VERSION = 1


@dataclass(frozen=True)
class UpdateHeader:
    """What an update promises: for whom, from which version to which, and exactly which bytes."""

    device_id: str
    cohort: str
    base_version: str
    target_version: str
    sha256_hex: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)

    def canonical_bytes(self) -> bytes:
        """Deterministic encoding covered by the signature (sorted-key compact JSON)."""
        doc = {
            "v": CANONICAL_VERSION,
            "device_id": self.device_id,
            "cohort": self.cohort,
            "base_version": self.base_version,
            "target_version": self.target_version,
            "sha256": self.sha256_hex,
            "size": self.size,
            "metadata": dict(sorted(self.metadata.items())),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def sign(self, key: Ed25519PrivateKey) -> tuple[bytes, str]:
        """``(signature, key_id)`` for this header."""
        return sign(key, self.canonical_bytes()), key_id(key)

    def verify(self, key: Ed25519PublicKey, signature: bytes) -> bool:
        """True if ``signature`` signs this header under ``key``."""
        return verify(key, self.canonical_bytes(), signature)

    @classmethod
    def from_proto(cls, msg: gateway_pb2.UpdateHeader) -> UpdateHeader:
        """The signed fields of a wire header."""
        return cls(
            device_id=msg.device_id,
            cohort=msg.cohort,
            base_version=msg.base_version,
            target_version=msg.target_version,
            sha256_hex=msg.payload.sha256.hex(),
            size=msg.payload.size,
            metadata=dict(msg.metadata),
        )

    def to_proto(
        self,
        *,
        update_id: int,
        payload: tensors_pb2.PayloadInfo,
        signature: bytes,
        key_id: str,
        created_unix_ms: int,
    ) -> gateway_pb2.UpdateHeader:
        """Wire header with the unsigned extras (id, tensor list, timestamps)."""
        return gateway_pb2.UpdateHeader(
            update_id=update_id,
            device_id=self.device_id,
            cohort=self.cohort,
            base_version=self.base_version,
            target_version=self.target_version,
            payload=payload,
            metadata=self.metadata,
            created_unix_ms=created_unix_ms,
            signature=signature,
            key_id=key_id,
        )
