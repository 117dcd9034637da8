"""Safetensors bytes with string metadata: the wire form of every tensor payload (never pickle)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.errors import TandemError


class PayloadError(TandemError):
    """A tensor payload is malformed, truncated or fails validation."""


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors (contiguous copies) and string metadata to safetensors bytes."""
    return st_save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=dict(metadata))


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata); PayloadError on anything malformed."""
    if not isinstance(data, bytes | bytearray) or len(data) < 8:
        raise PayloadError("payload is not safetensors bytes (too short)")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > len(data) - 8:
        raise PayloadError("payload is truncated (header longer than the data)")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise PayloadError(f"payload is not valid safetensors: {exc}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise PayloadError("payload metadata is not a mapping")
    return tensors, {str(k): str(v) for k, v in meta.items()}


def require(meta: dict[str, str], key: str) -> str:
    """A metadata value or PayloadError naming the missing key."""
    if key not in meta:
        raise PayloadError(f"payload metadata lacks {key!r}")
    return meta[key]
