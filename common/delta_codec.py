"""DWC wire format: sparse, blockwise-quantized adapter deltas and their bit-exact apply.

Layout. Every tensor of an adapter state (names sorted) is viewed as a matrix ``[a, b]`` (1-D tensors as
``[1, n]``) and cut into *units* along its longer side: rows when ``a <= b``, else columns. A LoRA ``A``
[r, in] gives r units of length ``in``, a ``B`` [out, r] gives r units of length ``out``, so units are
long enough for blockwise quantization to pay off. Both sides derive the layout from the state they hold;
the payload carries only its digest.

Payload (safetensors bytes, three tensors plus string metadata):
- ``mask``: uint8 bitmap over all units in layout order (which units the update touches);
- ``q``: the selected units' codes, each unit zero-padded to whole blocks; int8 as bytes, int4 two per
  byte or int2 (ternary) four per byte, as offset codes with the lowest bits first;
- ``scales``: one bfloat16 scale per block (symmetric absmax / qmax, rounded to bf16 *before* quantizing
  so both sides dequantize with the identical scale).
Metadata: format, base/target version (strings), bits, block, layout digest and the digest of the state
after apply. The header (``common.update_header.UpdateHeader``, the one header from here to the device's
apply) repeats format, bits, unit counts and the result digest in its signed metadata.

Apply is ``unit += q.float() * scale.float()`` in fp32 in layout order, the same function on cloud and
device, so the cloud's mirror and the device's state are bit-identical (the result digest checks it). Own
quantizer rather than bitsandbytes' dynamic code tables: a linear symmetric code is trivially identical
on every platform.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from common.tensor_pack import PayloadError, pack, require, unpack
from common.update_header import UpdateError, UpdateHeader, check_version

__all__ = ["UpdateError", "UpdateHeader", "apply_update", "encode_update", "state_digest"]

FORMAT = "tandem.dwc/1"
SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class UnitGroup:
    """How one tensor is cut into units."""

    name: str
    shape: tuple[int, ...]
    transposed: bool
    num_units: int
    unit_len: int


def _matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        raise UpdateError("scalar tensors are not supported in adapter states")
    if len(shape) == 1:
        return 1, shape[0]
    rows = shape[0]
    return rows, int(np.prod(shape[1:]))


def layout_of(state: dict[str, torch.Tensor]) -> list[UnitGroup]:
    """The unit layout of a state (sorted by name)."""
    groups = []
    for name in sorted(state):
        shape = tuple(state[name].shape)
        a, b = _matrix_dims(shape)
        transposed = a > b
        groups.append(UnitGroup(name, shape, transposed, b if transposed else a, a if transposed else b))
    return groups


def layout_digest(state: dict[str, torch.Tensor]) -> str:
    """Digest of names, shapes and dtypes: two states with the same digest can exchange deltas."""
    desc = [[n, list(state[n].shape), str(state[n].dtype)] for n in sorted(state)]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes: equal digests mean bit-identical states."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def unit_view(tensor: torch.Tensor, group: UnitGroup) -> torch.Tensor:
    """A [num_units, unit_len] view of ``tensor`` (writes go through)."""
    a, b = _matrix_dims(group.shape)
    mat = tensor.view(a, b)
    return mat.t() if group.transposed else mat


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def quantize_blocks(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax blockwise quantization of rows of ``x`` [R, L].

    Returns int8 codes [R, Lp] (Lp = L padded to whole blocks) and bf16 scales [R, Lp / block].
    """
    if bits not in SUPPORTED_BITS:
        raise UpdateError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    rows, length = x.shape
    lp = _padded(length, block)
    xp = torch.zeros(rows, lp, dtype=torch.float32)
    xp[:, :length] = x.float()
    blocks = xp.view(rows, lp // block, block)
    scales = (blocks.abs().amax(dim=2) / qmax).to(torch.bfloat16)
    s = scales.float().unsqueeze(2)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round(blocks / safe), torch.zeros_like(blocks)).clamp_(-qmax, qmax)
    return q.to(torch.int8).view(rows, lp), scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks` (fp32), cropped to ``length`` columns."""
    rows, lp = q.shape
    deq = q.float().view(rows, lp // block, block) * scales.float().unsqueeze(2)
    return deq.view(rows, lp)[:, :length]


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes -> bytes: int8 as is; 4- and 2-bit as offset codes, lowest bits first."""
    flat = q.reshape(-1)
    if bits == 8:
        return flat.view(torch.uint8)
    per = 8 // bits
    u = (flat.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, torch.zeros(pad, dtype=torch.uint8)])
    u = u.view(-1, per)
    out = torch.zeros(u.shape[0], dtype=torch.uint8)
    for j in range(per):
        out |= u[:, j] << (bits * j)
    return out


def _unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits == 8:
        return data.view(torch.int8)[:count]
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [((data >> (bits * j)) & mask).to(torch.int16) - (1 << (bits - 1)) for j in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:count].to(torch.int8)


def encoded_unit_bytes(unit_len: int, bits: int, block: int) -> int:
    """Wire bytes of one selected unit (codes + scales)."""
    lp = _padded(unit_len, block)
    return lp * bits // 8 + (lp // block) * 2


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """UpdateError naming the first tensor holding NaN or inf."""
    for name in sorted(state):
        if not torch.isfinite(state[name]).all():
            raise UpdateError(f"{what} holds NaN or inf in {name!r}")


def encode_update(
    base_state: dict[str, torch.Tensor],
    selected: dict[str, tuple[torch.Tensor, torch.Tensor]],
    bits: int,
    block: int,
    base_version: str,
    target_version: str,
) -> tuple[bytes, UpdateHeader, dict[str, torch.Tensor]]:
    """Build a payload from per-tensor (unit indices, unit deltas [k, unit_len]).

    Returns the payload, its header and the exact state a device holding ``base_state`` will have after
    applying it (computed with :func:`apply_update`, the device's own code path). The header is not yet
    addressed to a device or cohort (see ``UpdateHeader.addressed``).
    """
    check_version(base_version, "base_version")
    check_version(target_version, "target_version")
    if base_version == target_version:
        raise UpdateError("target_version must differ from base_version")
    if block <= 0 or block % 2:
        raise UpdateError("block must be a positive even number")
    groups = layout_of(base_state)
    total = sum(g.num_units for g in groups)
    mask = np.zeros(total, dtype=bool)
    codes, scales = [], []
    offset = 0
    for g in groups:
        if g.name in selected:
            idx, delta = selected[g.name]
            order = torch.argsort(idx)
            idx, delta = idx[order], delta[order]
            if delta.shape != (idx.numel(), g.unit_len):
                raise UpdateError(f"delta for {g.name!r} has shape {tuple(delta.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g.num_units):
                raise UpdateError(f"unit index out of range for {g.name!r}")
            mask[offset + idx.numpy()] = True
            if idx.numel():
                q, s = quantize_blocks(delta, bits, block)
                codes.append(q.reshape(-1))
                scales.append(s.reshape(-1))
        offset += g.num_units
    unknown = set(selected) - {g.name for g in groups}
    if unknown:
        raise UpdateError(f"unknown tensors in update: {sorted(unknown)[:3]}")
    all_codes = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int8)
    tensors = {
        "mask": torch.from_numpy(np.packbits(mask)),
        "q": _pack_codes(all_codes, bits),
        "scales": torch.cat(scales) if scales else torch.zeros(0, dtype=torch.bfloat16),
    }
    meta = {
        "format": FORMAT,
        "base_version": base_version,
        "target_version": target_version,
        "bits": str(bits),
        "block": str(block),
        "layout_sha256": layout_digest(base_state),
        "result_sha256": "",
    }
    provisional = pack(tensors, meta)
    result = apply_update(base_state, provisional, base_version, verify_result=False)
    meta["result_sha256"] = state_digest(result)
    payload = pack(tensors, meta)
    header = UpdateHeader(
        device_id="",
        cohort="",
        base_version=base_version,
        target_version=target_version,
        sha256_hex=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        metadata={
            "format": FORMAT,
            "bits": str(bits),
            "units_sent": str(int(mask.sum())),
            "units_total": str(total),
            "result_sha256": meta["result_sha256"],
        },
    )
    return payload, header, result


def _meta_int(meta: dict[str, str], key: str) -> int:
    try:
        return int(require(meta, key))
    except ValueError:
        raise UpdateError(f"payload metadata {key!r} is not an integer") from None


def apply_update(
    state: dict[str, torch.Tensor],
    payload: bytes,
    expected_base_version: str,
    header: UpdateHeader | None = None,
    verify_result: bool = True,
) -> dict[str, torch.Tensor]:
    """Verify and apply a payload to ``state``; returns a new state and never modifies ``state``.

    Raises UpdateError for a digest or version mismatch, a payload for other adapter shapes, malformed
    tensors, non-finite values, or a result that differs from the one the cloud computed.
    """
    if header is not None:
        if len(payload) != header.size or hashlib.sha256(payload).hexdigest() != header.sha256_hex:
            raise UpdateError("payload digest or size does not match its header")
        if header.base_version != expected_base_version:
            raise UpdateError(f"update is for base version {header.base_version}, device holds {expected_base_version}")
    try:
        tensors, meta = unpack(payload)
    except PayloadError as exc:
        raise UpdateError(str(exc)) from None
    if meta.get("format") != FORMAT:
        raise UpdateError(f"not a DWC payload (format {meta.get('format')!r})")
    base_version = meta.get("base_version")
    if base_version != expected_base_version:
        raise UpdateError(f"update is for base version {base_version}, device holds {expected_base_version}")
    if header is not None and (
        header.target_version != meta.get("target_version") or header.result_sha256 != meta.get("result_sha256")
    ):
        raise UpdateError("payload metadata disagrees with its header")
    if meta.get("layout_sha256") != layout_digest(state):
        raise UpdateError("update was built for different adapter tensors or shapes than the device holds")
    bits, block = _meta_int(meta, "bits"), _meta_int(meta, "block")
    if bits not in SUPPORTED_BITS or block <= 0 or block % 2:
        raise UpdateError(f"unsupported quantization bits={bits} block={block}")
    for key, dtype in (("mask", torch.uint8), ("q", torch.uint8), ("scales", torch.bfloat16)):
        if key not in tensors or tensors[key].dtype != dtype or tensors[key].dim() != 1:
            raise UpdateError(f"payload tensor {key!r} missing or malformed")
    groups = layout_of(state)
    total = sum(g.num_units for g in groups)
    if tensors["mask"].numel() != -(-total // 8):
        raise UpdateError("payload unit mask has the wrong length")
    mask = np.unpackbits(tensors["mask"].numpy())[:total].astype(bool)
    n_codes = sum(_padded(g.unit_len, block) * int(mask[o : o + g.num_units].sum()) for g, o in _offsets(groups))
    n_scales = n_codes // block
    if tensors["q"].numel() != -(-n_codes * bits // 8) or tensors["scales"].numel() != n_scales:
        raise UpdateError("payload code or scale count does not match its unit mask")
    if not torch.isfinite(tensors["scales"].float()).all():
        raise UpdateError("payload holds NaN or inf scales")
    codes = _unpack_codes(tensors["q"], bits, n_codes)
    scales = tensors["scales"]
    new_state = {name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in state.items()}
    c_off = s_off = 0
    for g, offset in _offsets(groups):
        idx = np.nonzero(mask[offset : offset + g.num_units])[0]
        if idx.size == 0:
            continue
        lp = _padded(g.unit_len, block)
        q = codes[c_off : c_off + idx.size * lp].view(idx.size, lp)
        s = scales[s_off : s_off + idx.size * (lp // block)].view(idx.size, lp // block)
        c_off += idx.size * lp
        s_off += idx.size * (lp // block)
        delta = dequantize_blocks(q, s, g.unit_len, block)
        units = unit_view(new_state[g.name], g)
        rows = torch.from_numpy(idx)
        units[rows] = (units[rows].float() + delta).to(units.dtype)
    check_finite(new_state, "updated adapter state")
    if verify_result and meta.get("result_sha256") and state_digest(new_state) != meta["result_sha256"]:
        raise UpdateError("applied state differs from the cloud's mirror (result digest mismatch)")
    return new_state


def _offsets(groups: list[UnitGroup]):
    offset = 0
    for g in groups:
        yield g, offset
        offset += g.num_units
