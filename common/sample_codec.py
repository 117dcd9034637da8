"""The uplinked sample: selected vision-tower features (int8, one scale per token), their patch indices, the
question, the device's answer distribution (top-k) and its uncertainty, as safetensors bytes.

Tensors: ``q`` int8 codes [k, D], ``s`` fp16 scales [k], ``idx`` int16 patch indices [k], ``aid`` int32 /
``ap`` fp16 the device's top-m answer tokens and probabilities; metadata: format, question, num_patches,
uncertainty (JSON). Device encodes (``device.uts``), cloud decodes (``cloud.akd``), both through here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from common.tensor_pack import PayloadError, pack, require, unpack

FORMAT = "tandem.uts.sample/1"
MAX_QUESTION_CHARS = 4096


@dataclass
class UploadSample:
    """What the cloud gets for one uncertain sample (features already dequantized on decode)."""

    features: torch.Tensor  # [k, D] float32
    patch_indices: torch.Tensor  # [k] int64, ascending, < num_patches
    num_patches: int
    question: str
    answer_ids: torch.Tensor  # [m] int64, device's top-m answer tokens
    answer_probs: torch.Tensor  # [m] float32
    uncertainty: dict[str, float] = field(default_factory=dict)


def quantize_tokens(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: codes [k, D] int8 and fp16 scales [k] (absmax / 127)."""
    absmax = features.float().abs().amax(dim=1)
    scales = (absmax / 127.0).to(torch.float16)
    s = scales.float().clamp_min(1e-12).unsqueeze(1)
    codes = torch.round(features.float() / s).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_tokens(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_tokens` (float32)."""
    return codes.float() * scales.float().unsqueeze(1)


def encode_sample(sample: UploadSample) -> bytes:
    """Serialise a sample (features quantized to int8 here); PayloadError on inconsistent fields."""
    _validate(sample)
    codes, scales = quantize_tokens(sample.features)
    if not torch.isfinite(scales.float()).all():
        raise PayloadError("feature scale overflows fp16 (features too large)")
    tensors = {
        "q": codes,
        "s": scales,
        "idx": sample.patch_indices.to(torch.int16 if sample.num_patches < 32768 else torch.int32),
        "aid": sample.answer_ids.to(torch.int32),
        "ap": sample.answer_probs.to(torch.float16),
    }
    meta = {
        "format": FORMAT,
        "question": sample.question,
        "num_patches": str(sample.num_patches),
        "uncertainty": json.dumps(
            {k: round(float(v), 5) for k, v in sample.uncertainty.items()}, separators=(",", ":")
        ),
    }
    return pack(tensors, meta)


def decode_sample(data: bytes) -> UploadSample:
    """Parse and validate an uploaded sample; PayloadError naming what is wrong."""
    tensors, meta = unpack(data)
    if meta.get("format") != FORMAT:
        raise PayloadError(f"not an uploaded sample (format {meta.get('format')!r})")
    try:
        num_patches = int(require(meta, "num_patches"))
        uncertainty = {str(k): float(v) for k, v in json.loads(require(meta, "uncertainty")).items()}
    except (ValueError, AttributeError, TypeError):
        raise PayloadError("sample metadata num_patches/uncertainty malformed") from None
    expected = {
        "q": (torch.int8, 2),
        "s": (torch.float16, 1),
        "idx": (None, 1),
        "aid": (torch.int32, 1),
        "ap": (torch.float16, 1),
    }
    for key, (dtype, dims) in expected.items():
        t = tensors.get(key)
        if t is None or t.dim() != dims or (dtype is not None and t.dtype != dtype):
            raise PayloadError(f"sample tensor {key!r} missing or malformed")
    if tensors["idx"].dtype not in (torch.int16, torch.int32):
        raise PayloadError("sample patch indices must be int16 or int32")
    sample = UploadSample(
        features=dequantize_tokens(tensors["q"], tensors["s"]),
        patch_indices=tensors["idx"].long(),
        num_patches=num_patches,
        question=require(meta, "question"),
        answer_ids=tensors["aid"].long(),
        answer_probs=tensors["ap"].float(),
        uncertainty=uncertainty,
    )
    if tensors["s"].shape[0] != tensors["q"].shape[0]:
        raise PayloadError("sample has a different number of feature scales and tokens")
    _validate(sample)
    return sample


def _validate(s: UploadSample) -> None:
    k = s.features.shape[0] if s.features.dim() == 2 else -1
    if k <= 0:
        raise PayloadError("a sample must carry at least one visual token ([k, D] features)")
    if not torch.isfinite(s.features).all():
        raise PayloadError("sample features hold NaN or inf")
    idx = s.patch_indices
    if idx.dim() != 1 or idx.numel() != k:
        raise PayloadError(f"{idx.numel()} patch indices for {k} tokens")
    if s.num_patches <= 0 or int(idx.min()) < 0 or int(idx.max()) >= s.num_patches:
        raise PayloadError(f"patch indices must lie in [0, {s.num_patches})")
    if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise PayloadError("patch indices must be strictly ascending")
    if not s.question or len(s.question) > MAX_QUESTION_CHARS:
        raise PayloadError(f"question must have 1..{MAX_QUESTION_CHARS} characters")
    if s.answer_ids.shape != s.answer_probs.shape or s.answer_ids.dim() != 1:
        raise PayloadError("answer ids and probabilities must be 1-D of the same length")
    probs = s.answer_probs
    if probs.numel() and (not torch.isfinite(probs).all() or float(probs.min()) < 0 or float(probs.sum()) > 1.01):
        raise PayloadError("answer probabilities must be finite, >= 0 and sum to at most 1")
    if any(not math.isfinite(v) for v in s.uncertainty.values()):
        raise PayloadError("uncertainty values must be finite")
