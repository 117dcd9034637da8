"""What every update registry does before storing an update: check the addressing and versions, digest,
sign and describe the payload. The backends differ only in where rows and bytes go."""

from __future__ import annotations

from cloud.updates.base import UpdateRecord
from common import clock as clocks
from common.codec import sha256_hex
from common.errors import TandemError
from common.signing import Ed25519PrivateKey
from common.update_header import VERSION_RE, UpdateHeader
from protocol.payload import describe_payload


class PublishError(TandemError):
    """An update cannot be published (bad versions or addressing)."""


def prepare_update(
    key: Ed25519PrivateKey,
    device_id: str,
    cohort: str,
    base: str,
    target: str,
    payload: bytes,
    metadata: dict | None,
) -> UpdateRecord:
    """Validate, digest, sign and describe an update for one device (``cohort`` '') or a cohort: its record with
    ``update_id`` 0 (the registry numbers it with ``dataclasses.replace`` when the row is stored)."""
    if bool(device_id) == bool(cohort):
        raise PublishError("address an update to exactly one of a device_id or a cohort (neither may be empty)")
    for name, value in (("base_version", base), ("target_version", target)):
        if not isinstance(value, str) or not VERSION_RE.match(value):
            raise PublishError(f"{name} {value!r} must be 1-128 chars of [A-Za-z0-9._:+-]")
    if base == target:
        raise PublishError("target_version must differ from base_version")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    digest = sha256_hex(payload)
    header = UpdateHeader(device_id, cohort, base, target, digest, len(payload), meta)
    signature, kid = header.sign(key)
    return UpdateRecord(
        0,
        device_id,
        cohort,
        base,
        target,
        digest,
        len(payload),
        meta,
        clocks.current().now_ms(),
        signature,
        kid,
        describe_payload(payload).SerializeToString(),
    )
