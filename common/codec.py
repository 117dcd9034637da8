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


DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
"""Every safetensors dtype and its width in bits (the format's own list)."""

MAX_TENSOR_DIMS = 32
_BAD = "not a valid safetensors payload"


def read_header(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Return ``(tensor entries, __metadata__)`` of a safetensors byte string, checked as strictly as the format.

    Every entry must name a known dtype, a list of non-negative integer dims and integer ``data_offsets`` that
    match ``dtype x shape``; the tensors must tile the data area exactly; ``__metadata__`` must map strings to
    strings. Anything else raises CodecError (never KeyError, TypeError or RecursionError).
    """
    if len(data) < _HEADER_LEN_BYTES:
        raise CodecError("not a valid safetensors payload: shorter than its header length")
    (header_len,) = struct.unpack("<Q", bytes(data[:_HEADER_LEN_BYTES]))
    if header_len > _MAX_HEADER_BYTES or _HEADER_LEN_BYTES + header_len > len(data):
        raise CodecError("not a valid safetensors payload: header length out of range")
    raw = bytes(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    if not raw.startswith(b"{"):
        raise CodecError("not a valid safetensors payload: header is not a JSON object")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CodecError(f"not a valid safetensors payload: header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise CodecError("not a valid safetensors payload: header is not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CodecError("not a valid safetensors payload: __metadata__ must map strings to strings")
    body = len(data) - _HEADER_LEN_BYTES - header_len
    spans = sorted(_tensor_span(name, entry) for name, entry in header.items())
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise CodecError(f"{_BAD}: tensor {_short(name)} does not start where the last ended")
        end = stop
    if end != body:
        raise CodecError(f"not a valid safetensors payload: tensors cover {end} of {body} data bytes")
    return header, metadata


def _tensor_span(name: str, entry: Any) -> tuple[int, int, str]:
    """``(start, stop, name)`` of one header entry after checking dtype, shape and offsets agree."""
    if not isinstance(entry, dict):
        raise CodecError(f"not a valid safetensors payload: entry {_short(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CodecError(f"{_BAD}: tensor {_short(name)} has unknown dtype {str(dtype)[:20]!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(_is_count(d) for d in shape)):
        raise CodecError(
            f"not a valid safetensors payload: tensor {_short(name)} shape must be a list of at most "
            f"{MAX_TENSOR_DIMS} non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CodecError(f"not a valid safetensors payload: bad data offsets for tensor {_short(name)}")
    start, stop = offsets
    elements = 1
    for d in shape:
        elements *= d
    nbytes, rest = divmod(elements * DTYPE_BITS[dtype], 8)
    if rest or stop < start or stop - start != nbytes:
        raise CodecError(
            f"not a valid safetensors payload: tensor {_short(name)} shape and dtype {dtype} disagree with its "
            "data_offsets"
        )
    return start, stop, name


def _short(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_infos(data: bytes) -> list[TensorInfo]:
    """Describe every tensor in a safetensors payload without materialising it (sorted by name)."""
    header, metadata = read_header(data)
    quant = _quantization(metadata)
    return [
        TensorInfo(
            name=name,
            dtype=entry["dtype"],
            shape=tuple(entry["shape"]),
            quantization=quant.get(name, {}),
        )
        for name, entry in sorted(header.items())
    ]


def _quantization(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The ``quantization`` metadata: tensor name -> scheme details, with integer ``bits`` and ``group_size``."""
    if QUANT_METADATA_KEY not in metadata:
        return {}
    try:
        quant = json.loads(metadata[QUANT_METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"quantization metadata is not JSON: {str(exc)[:100]}") from None
    if not isinstance(quant, dict) or not all(isinstance(q, dict) for q in quant.values()):
        raise CodecError("quantization metadata must map tensor names to objects")
    for name, q in quant.items():
        for key in ("bits", "group_size"):
            v = q.get(key, 0)
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31):
                raise CodecError(f"quantization {key} of {_short(name)} must be an integer in [0, 2^31)")
        if not isinstance(q.get("scheme", "none"), str):
            raise CodecError(f"quantization scheme of {_short(name)} must be a string")
    return quant


def is_safetensors(data: bytes) -> bool:
    """True if ``data`` parses as a safetensors payload."""
    try:
        read_header(data)
    except CodecError:
        return False
    return True
