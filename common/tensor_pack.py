"""Safetensors bytes with string metadata: the wire form of every tensor payload (never pickle)."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.codec import CodecError, read_header
from common.errors import TandemError


class PayloadError(TandemError):
    """A tensor payload is malformed, truncated or fails validation."""


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors (contiguous copies) and string metadata to safetensors bytes."""
    return st_save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=dict(metadata))


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata); PayloadError on anything malformed.

    The header is checked by ``common.codec.read_header`` (the one safetensors header parser) before any
    tensor is materialised.
    """
    if not isinstance(data, bytes | bytearray):
        raise PayloadError("payload is not safetensors bytes")
    try:
        _, meta = read_header(data)
    except CodecError as exc:
        raise PayloadError(str(exc)) from None
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise PayloadError(f"payload is not valid safetensors: {exc}") from None
    return tensors, meta


def require(meta: dict[str, str], key: str) -> str:
    """A metadata value or PayloadError naming the missing key."""
    if key not in meta:
        raise PayloadError(f"payload metadata lacks {key!r}")
    return meta[key]
