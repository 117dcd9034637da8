"""Conversions between payload bytes and ``tandem.v1.PayloadInfo`` (size, sha256, tensor list)."""

from __future__ import annotations

from common.codec import CodecError, is_safetensors, sha256_digest, tensor_infos
from protocol.tandem.v1 import tensors_pb2

FORMAT_SAFETENSORS = "safetensors"
FORMAT_OPAQUE = "opaque"


def describe_payload(data: bytes, sha256: bytes | None = None) -> tensors_pb2.PayloadInfo:
    """PayloadInfo for ``data``: safetensors payloads list their tensors, anything else is opaque.

    ``sha256`` is a digest the caller already computed over exactly these bytes (skips re-hashing).
    """
    info = tensors_pb2.PayloadInfo(size=len(data), sha256=sha256 or sha256_digest(data))
    if is_safetensors(data):
        try:
            tensors = tensor_infos(data)
        except CodecError:
            info.format = FORMAT_OPAQUE
            return info
        info.format = FORMAT_SAFETENSORS
        for t in tensors:
            q = t.quantization
            info.tensors.add(
                name=t.name,
                dtype=t.dtype,
                shape=list(t.shape),
                quantization=tensors_pb2.Quantization(
                    scheme=str(q.get("scheme", "none")),
                    bits=int(q.get("bits", 0)),
                    group_size=int(q.get("group_size", 0)),
                    params={k: str(v) for k, v in q.items() if k not in ("scheme", "bits", "group_size")},
                ),
            )
    else:
        info.format = FORMAT_OPAQUE
    return info


def check_payload(data: bytes, info: tensors_pb2.PayloadInfo) -> str | None:
    """Why ``data`` does not match ``info`` (size, digest, tensor list), or None when it matches."""
    if len(data) != info.size:
        return f"payload size {len(data)} != declared size {info.size}"
    if sha256_digest(data) != info.sha256:
        return "payload sha256 digest does not match"
    if info.format == FORMAT_SAFETENSORS:
        actual = describe_payload(data)
        if actual.format != FORMAT_SAFETENSORS:
            return "payload declared safetensors but does not parse as safetensors"
        declared = [(t.name, t.dtype, tuple(t.shape)) for t in info.tensors]
        found = [(t.name, t.dtype, tuple(t.shape)) for t in actual.tensors]
        if declared and declared != found:
            return "declared tensor list (name, dtype, shape) differs from the payload"
    return None
