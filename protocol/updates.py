"""Wire conversions of the one update header (``common.update_header.UpdateHeader``).

The header itself (fields, canonical bytes, signing) lives in ``common`` because the DWC step builds it; this
module only maps it to and from ``tandem.v1.UpdateHeader``.
"""

from __future__ import annotations

from common.update_header import CANONICAL_VERSION, UpdateHeader
from protocol.tandem.v1 import gateway_pb2, tensors_pb2

__all__ = ["CANONICAL_VERSION", "UpdateHeader", "header_from_proto", "header_to_proto"]


def header_from_proto(msg: gateway_pb2.UpdateHeader) -> UpdateHeader:
    """The signed fields of a wire header."""
    return UpdateHeader(
        device_id=msg.device_id,
        cohort=msg.cohort,
        base_version=msg.base_version,
        target_version=msg.target_version,
        sha256_hex=msg.payload.sha256.hex(),
        size=msg.payload.size,
        metadata=dict(msg.metadata),
    )


def header_to_proto(
    header: UpdateHeader,
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
        device_id=header.device_id,
        cohort=header.cohort,
        base_version=header.base_version,
        target_version=header.target_version,
        payload=payload,
        metadata=header.metadata,
        created_unix_ms=created_unix_ms,
        signature=signature,
        key_id=key_id,
    )
