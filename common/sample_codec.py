"""The uplinked sample: selected vision-tower features, their patch indices, the question, the device's answer
distribution (top-k) and its uncertainty. Two versioned formats, told apart by their first bytes:

- ``tandem.uts.sample/1``: safetensors bytes. Tensors: ``q`` int8 codes [k, D], ``s`` fp16 scales [k], ``idx``
  int16 patch indices [k], ``aid`` int32 / ``ap`` fp16 the device's top-m answer tokens and probabilities;
  metadata: format, question, num_patches, uncertainty (JSON).
- ``tandem.uts.sample/2``: few-bit coefficients on a shared feature basis, entropy-coded
  (``common.feature_codec``); decoding needs the basis the sample names (a :class:`BasisBook`).

Device encodes (``device.uts``), cloud decodes (``cloud.akd``), both through here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from common.feature_basis import KNOWN_BASES, BasisBook, FeatureBasis
from common.feature_codec import FORMAT_V2, Rate, encode_v2, is_v2, parse_v2, reconstruct
from common.tensor_pack import PayloadError, pack, require, unpack

FORMAT = "tandem.uts.sample/1"
FORMATS = (FORMAT, FORMAT_V2)
"""Every sample format this code reads (what a cloud announces it accepts)."""
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
    grid: tuple[int, int] | None = None
    """The image's visual-token grid (rows, columns) when it is not square (Qwen2-VL's dynamic resolution): where
    each patch index sits for 2D positions. Format /1 carries it (metadata ``grid``); None: a square grid."""


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


@dataclass(frozen=True)
class SampleCoding:
    """How to encode the features of a sample in format /2: on which basis, at which rate."""

    basis: FeatureBasis
    rate: Rate


def encode_sample(sample: UploadSample, coding: SampleCoding | None = None) -> bytes:
    """Serialise a sample: format /1 (int8 features) without ``coding``, else /2 on its basis and rate;
    PayloadError on inconsistent fields."""
    _validate(sample)
    if coding is not None and sample.grid is not None and sample.grid[0] != sample.grid[1]:
        raise PayloadError(f"format /2 carries no token grid; a {sample.grid} grid needs format /1")
    if coding is not None:
        return encode_v2(
            sample.features,
            sample.patch_indices,
            sample.num_patches,
            sample.question,
            sample.answer_ids,
            sample.answer_probs,
            sample.uncertainty,
            coding.basis,
            coding.rate,
        )
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
        **({"grid": f"{sample.grid[0]}x{sample.grid[1]}"} if sample.grid is not None else {}),
        "uncertainty": json.dumps(
            {k: round(float(v), 5) for k, v in sample.uncertainty.items()}, separators=(",", ":")
        ),
    }
    return pack(tensors, meta)


_EXPECTED = {
    "q": (torch.int8, 2),
    "s": (torch.float16, 1),
    "idx": (None, 1),
    "aid": (torch.int32, 1),
    "ap": (torch.float16, 1),
}
MAX_NUM_PATCHES = 2**31 - 1


@dataclass
class _Parsed:
    tensors: dict[str, torch.Tensor]
    num_patches: int
    question: str
    uncertainty: dict[str, float]
    grid: tuple[int, int] | None = None


def check_sample(data: bytes, bases: BasisBook | None = None) -> None:
    """Raise PayloadError unless ``data`` is a sample :func:`decode_sample` accepts (the gateway's check).

    The same checks as decoding, without dequantizing /1 features (a /2 sample is reconstructed: its
    features are only finite if the basis and codes make them so).
    """
    if isinstance(data, bytes | bytearray) and is_v2(data):
        _validate(_decode_v2(bytes(data), bases or KNOWN_BASES))
        return
    p = _parse(data)
    t = p.tensors
    _check_fields(
        t["q"].shape[0],
        bool(torch.isfinite(t["s"]).all()),
        t["idx"],
        p.num_patches,
        p.question,
        t["aid"],
        t["ap"].float(),
        p.uncertainty,
    )


def decode_sample(data: bytes, bases: BasisBook | None = None) -> UploadSample:
    """Parse and validate an uploaded sample (either format; /2 needs its basis in ``bases``, by default the
    process's ``KNOWN_BASES``); PayloadError naming what is wrong."""
    if not isinstance(data, bytes | bytearray):
        raise PayloadError("sample payload must be bytes")
    if is_v2(data):
        sample = _decode_v2(bytes(data), bases or KNOWN_BASES)
        _validate(sample)
        return sample
    p = _parse(data)
    t = p.tensors
    sample = UploadSample(
        features=dequantize_tokens(t["q"], t["s"]),
        patch_indices=t["idx"].long(),
        num_patches=p.num_patches,
        question=p.question,
        answer_ids=t["aid"].long(),
        answer_probs=t["ap"].float(),
        uncertainty=p.uncertainty,
        grid=p.grid,
    )
    _validate(sample)
    return sample


def _decode_v2(data: bytes, bases: BasisBook) -> UploadSample:
    """A /2 sample with its features reconstructed on the basis it names."""
    known = {v: (b.rank, b.dim) for v in bases.versions() if (b := bases.get(v)) is not None}
    d = parse_v2(data, known)
    basis = bases.get(d.basis_version)
    assert basis is not None  # parse_v2 checked it is known
    return UploadSample(
        features=reconstruct(d.exps, d.codes, basis),
        patch_indices=torch.from_numpy(d.patch_indices.astype("int64")),
        num_patches=d.num_patches,
        question=d.question,
        answer_ids=torch.from_numpy(d.answer_ids.astype("int64")),
        answer_probs=torch.from_numpy(d.answer_probs.astype("float32")),
        uncertainty=d.uncertainty,
    )


def _parse(data: bytes) -> _Parsed:
    """Tensors and metadata of a sample, checked for format, names, dtypes and ranks."""
    tensors, meta = unpack(data)
    if meta.get("format") != FORMAT:
        raise PayloadError(f"not an uploaded sample (format {meta.get('format', '')[:40]!r}, expected {FORMAT!r})")
    try:
        num_patches = int(require(meta, "num_patches"))
        raw = json.loads(require(meta, "uncertainty"))
        uncertainty = {str(k): float(v) for k, v in raw.items()}
        grid_text = meta.get("grid")
        grid = tuple(int(x) for x in grid_text.split("x", 1)) if grid_text is not None else None
    except (ValueError, AttributeError, TypeError, OverflowError, RecursionError):
        raise PayloadError("sample metadata num_patches/uncertainty/grid malformed") from None
    if not 1 <= num_patches <= MAX_NUM_PATCHES:
        raise PayloadError(f"num_patches must lie in [1, {MAX_NUM_PATCHES}]")
    if grid is not None and (len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != num_patches):
        raise PayloadError(f"sample grid {grid_text[:20]!r} does not hold num_patches {num_patches} tokens")
    unexpected = sorted(set(tensors) - set(_EXPECTED))
    if unexpected:
        raise PayloadError(f"unexpected sample tensors {unexpected[:5]}")
    for key, (dtype, dims) in _EXPECTED.items():
        t = tensors.get(key)
        if t is None or t.dim() != dims or (dtype is not None and t.dtype != dtype):
            raise PayloadError(f"sample tensor {key!r} missing or malformed")
    if tensors["idx"].dtype not in (torch.int16, torch.int32):
        raise PayloadError("sample patch indices must be int16 or int32")
    if tensors["q"].shape[1] == 0:
        raise PayloadError("sample features must have at least one dimension per token")
    if tensors["s"].shape[0] != tensors["q"].shape[0]:
        raise PayloadError("sample has a different number of feature scales and tokens")
    return _Parsed(tensors, num_patches, require(meta, "question"), uncertainty, grid)  # type: ignore[arg-type]


def _validate(s: UploadSample) -> None:
    k = s.features.shape[0] if s.features.dim() == 2 else -1
    finite = bool(torch.isfinite(s.features).all())
    _check_fields(k, finite, s.patch_indices, s.num_patches, s.question, s.answer_ids, s.answer_probs, s.uncertainty)


def _check_fields(
    k: int,
    features_finite: bool,
    idx: torch.Tensor,
    num_patches: int,
    question: str,
    answer_ids: torch.Tensor,
    probs: torch.Tensor,
    uncertainty: dict[str, float],
) -> None:
    """The checks every sample passes, on its encoding side and its decoding side."""
    if k <= 0:
        raise PayloadError("a sample must carry at least one visual token ([k, D] features)")
    if not features_finite:
        raise PayloadError("sample features hold NaN or inf")
    if idx.dim() != 1 or idx.numel() != k:
        raise PayloadError(f"{idx.numel()} patch indices for {k} tokens")
    if num_patches <= 0 or int(idx.min()) < 0 or int(idx.max()) >= num_patches:
        raise PayloadError(f"patch indices must lie in [0, {num_patches})")
    if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise PayloadError("patch indices must be strictly ascending")
    if not question or len(question) > MAX_QUESTION_CHARS:
        raise PayloadError(f"question must have 1..{MAX_QUESTION_CHARS} characters")
    if answer_ids.shape != probs.shape or answer_ids.dim() != 1:
        raise PayloadError("answer ids and probabilities must be 1-D of the same length")
    if probs.numel() and (not torch.isfinite(probs).all() or float(probs.min()) < 0 or float(probs.sum()) > 1.01):
        raise PayloadError("answer probabilities must be finite, >= 0 and sum to at most 1")
    if any(not math.isfinite(v) for v in uncertainty.values()):
        raise PayloadError("uncertainty values must be finite")
