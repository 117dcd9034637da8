"""DWC against the uncompressed fp32 adapter downlink, at LLaVA-1.5-7B LoRA geometry (CPU), over a range of budgets.

Builds a rank-16 LoRA state for q/k/v/o/gate/up/down of a 4096-wide, 11008-FFN Llama (32 layers; 4 with
--quick), moves it by one synthetic training step whose change is concentrated in a few ranks (as LoRA
updates are), then, for byte budgets of 1/5 to 1/80 of the fp32 adapter, compresses the step against the mirror,
applies it as the device does and measures what the selection loses: the share of the step's energy the device
does not hold afterwards, next to the bytes actually sent and the time against shipping the fp32 adapter
(safetensors encode + decode) in the same run. Targets: bit-exact device state, every payload within its budget,
a loss that grows as the budget shrinks.

    python -m bench.dwc_codec [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from safetensors.torch import load as st_load

from bench._verdict import verdict
from cloud.dwc import CloudMirror, DWCConfig, compress
from common.delta_codec import apply_update, state_digest
from common.tensor_pack import pack

MODULES = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def lora_state(layers: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for mod, (out_f, in_f) in MODULES.items():
            p = f"base_model.model.model.language_model.layers.{i}.self_attn.{mod}"
            state[f"{p}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            state[f"{p}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
    return state


def training_step(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A change concentrated in 3 of the ranks of each B plus small noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        d = torch.randn(v.shape, generator=g) * 1e-5
        if "lora_B" in k:
            d[:, :3] += torch.randn(v.shape[0], 3, generator=g) * 1e-3
        out[k] = v + d
    return out


FRACTIONS = (5, 10, 20, 40, 80)
"""Byte budgets, as 1/k of the fp32 adapter's bytes."""


def residual_share(state: dict[str, torch.Tensor], base: dict, target: dict) -> float:
    """The share of the step's energy (``target - base``) the device does not hold: 0 is lossless."""
    lost = sum(float(((state[k] - target[k]) ** 2).sum()) for k in target)
    step = sum(float(((target[k] - base[k]) ** 2).sum()) for k in target)
    return lost / step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers instead of 32")
    args = ap.parse_args(argv)
    layers = 4 if args.quick else 32
    base = lora_state(layers, 16, 0)
    target = training_step(base, 1)
    params = sum(v.numel() for v in base.values())

    t = time.perf_counter()
    fp32 = pack(target, {"format": "peft-adapter"})
    received = st_load(fp32)
    fp32_s = time.perf_counter() - t
    assert all(torch.equal(received[k], target[k]) for k in target)
    print(f"adapter: {layers} layers, LoRA r=16, {params / 1e6:.1f} M parameters")
    print(f"fp32 downlink: {len(fp32):,} B, encode+decode {fp32_s:.3f} s (the baseline of every ratio below)")
    print("budget      DWC bytes  bits  units sent   measured loss  codec's sent share  (compress+apply)/fp32  exact")
    rows = []
    for k in FRACTIONS:
        budget = len(fp32) // k
        t = time.perf_counter()
        update = compress(CloudMirror(base), target, DWCConfig(bits="auto", budget_bytes=budget))
        device = apply_update(base, update.payload, "v0", header=update.header)
        codec_s = time.perf_counter() - t
        exact = state_digest(device) == state_digest(update.result_state)
        loss = residual_share(device, base, target)
        h = update.header
        rows.append((k, budget, len(update.payload), loss, exact))
        print(
            f"1/{k:<3} {len(update.payload):>14,} {h.bits:>5} {h.units_sent:>5}/{h.units_total:<5}"
            f"   {100 * loss:10.2f}%   {100 * update.sent_share:12.1f}%   {codec_s / fp32_s:16.1f}x   {exact}"
        )
    print("measured loss: share of the training step's energy the device does not hold after the apply")
    checks = [(all(r[4] for r in rows), "device state == cloud mirror (bit-exact) at every budget")]
    checks.append((all(r[2] <= r[1] for r in rows), "every payload within its budget"))
    losses = [r[3] for r in rows]  # budgets shrink along FRACTIONS
    checks.append(
        (
            losses == sorted(losses),
            "loss grows as the budget shrinks: " + ", ".join(f"1/{r[0]} {100 * r[3]:.1f}%" for r in rows),
        )
    )
    return verdict("dwc_codec", checks)


if __name__ == "__main__":
    sys.exit(main())
