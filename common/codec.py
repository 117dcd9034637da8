"""Tensor codec: safetensors bytes <-> dicts of tensors, payload descriptions, sha256 digests, chunking.

Nothing here uses pickle. Quantization metadata rides in the safetensors ``__metadata__`` under the key
``"quantization"`` as JSON: ``{"<tensor name>": {"scheme": "int8", "bits": 8, "group_size": 64, ...}}``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.errors import TandemError

if TYPE_CHECKING:
    import torch

QUANT_METADATA_KEY = "quantization"
_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CodecError(TandemError):
    """A payload is not valid safetensors or disagrees with its description."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype, shape and quantization of one tensor inside a safetensors payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    quantization: Mapping[str, Any] = field(default_factory=dict)


def sha256_digest(data: bytes | memoryview) -> bytes:
    """Raw 32-byte sha256 digest of ``data``."""
    return hashlib.sha256(data).digest()


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex sha256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def iter_chunks(data: bytes, chunk_size: int, start: int = 0) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset, view)`` pieces of at most ``chunk_size`` bytes from ``start`` (one for b'')."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = memoryview(data)
    if start >= len(view):
        if len(view) == 0 and start == 0:
            yield 0, view
        return
    for offset in range(start, len(view), chunk_size):
        yield offset, view[offset : offset + chunk_size]


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    quantization: Mapping[str, Mapping[str, Any]] | None = None,
) -> bytes:
    """Serialise tensors to safetensors bytes; ``quantization`` maps tensor names to their scheme details."""
    from safetensors.torch import save

    meta = dict(metadata or {})
    if quantization:
        unknown = set(quantization) - set(tensors)
        if unknown:
            raise CodecError(f"quantization given for unknown tensors: {sorted(unknown)}")
        meta[QUANT_METADATA_KEY] = json.dumps(quantization, sort_keys=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return save(dict(tensors), metadata=meta or None)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a dict of CPU tensors."""
    from safetensors.torch import load

    read_header(data)  # clear error for non-safetensors input
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CodecError(f"not a valid safetensors payload: {exc}") from exc


def read_header(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Return ``(tensor entries, __metadata__)`` from a safetensors byte string, validating offsets."""
    if len(data) < _HEADER_LEN_BYTES:
        raise CodecError("not a valid safetensors payload: shorter than its header length")
    (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN_BYTES])
    if header_len > _MAX_HEADER_BYTES or _HEADER_LEN_BYTES + header_len > len(data):
        raise CodecError("not a valid safetensors payload: header length out of range")
    try:
        header = json.loads(bytes(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"not a valid safetensors payload: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CodecError("not a valid safetensors payload: header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    body = len(data) - _HEADER_LEN_BYTES - header_len
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= body):
            raise CodecError(f"not a valid safetensors payload: bad data offsets for tensor {name!r}")
    return header, metadata


def tensor_infos(data: bytes) -> list[TensorInfo]:
    """Describe every tensor in a safetensors payload without materialising it (sorted by name)."""
    header, metadata = read_header(data)
    quant: dict[str, Any] = {}
    if QUANT_METADATA_KEY in metadata:
        try:
            quant = json.loads(metadata[QUANT_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise CodecError(f"quantization metadata is not JSON: {exc}") from exc
    return [
        TensorInfo(
            name=name,
            dtype=str(entry["dtype"]),
            shape=tuple(int(d) for d in entry["shape"]),
            quantization=quant.get(name, {}),
        )
        for name, entry in sorted(header.items())
    ]


def is_safetensors(data: bytes) -> bool:
    """True if ``data`` parses as a safetensors payload."""
    try:
        read_header(data)
    except CodecError:
        return False
    return True
