"""What every update registry does before storing an update: check the addressing and versions, digest,
sign and describe the payload. The backends differ only in where rows and bytes go."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from common import clock as clocks
from common.codec import sha256_hex
from common.errors import TandemError
from common.signing import Ed25519PrivateKey
from common.update_header import VERSION_RE, UpdateHeader
from protocol.payload import describe_payload

if TYPE_CHECKING:
    from cloud.updates.base import UpdateRecord


class PublishError(TandemError):
    """An update cannot be published (bad versions or addressing)."""


def prepare_update(key: Ed25519PrivateKey, header: UpdateHeader, payload: bytes) -> UpdateRecord:
    """Validate the addressing and versions of ``header``, check (or, for an unsigned header with size -1, fill
    in) its payload digest and size, sign it; its record with ``update_id`` 0 (the registry numbers it)."""
    from cloud.updates.base import UpdateRecord  # noqa: PLC0415 (base imports this module)

    if bool(header.device_id) == bool(header.cohort):
        raise PublishError("address an update to exactly one of a device_id or a cohort (neither may be empty)")
    for name, value in (("base_version", header.base_version), ("target_version", header.target_version)):
        if not isinstance(value, str) or not VERSION_RE.match(value):
            raise PublishError(f"{name} {value!r} must be 1-128 chars of [A-Za-z0-9._:+-]")
    if header.base_version == header.target_version:
        raise PublishError("target_version must differ from base_version")
    digest = sha256_hex(payload)
    if header.size == -1:
        header = dataclasses.replace(header, sha256_hex=digest, size=len(payload))
    elif (header.sha256_hex, header.size) != (digest, len(payload)):
        raise PublishError("the header's sha256 and size do not describe the payload")
    signature, kid = header.sign(key)
    return UpdateRecord(
        0, header, clocks.current().now_ms(), signature, kid, describe_payload(payload).SerializeToString()
    )
