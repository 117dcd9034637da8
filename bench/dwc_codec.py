"""DWC against the uncompressed fp32 adapter downlink, at LLaVA-1.5-7B LoRA geometry (CPU).

Builds a rank-16 LoRA state for q/k/v/o/gate/up/down of a 4096-wide, 11008-FFN Llama (32 layers; 4 with
--quick), moves it by one synthetic training step whose change is concentrated in a few ranks (as LoRA
updates are), then measures side by side: bytes and time of shipping the fp32 adapter (safetensors
encode + decode) versus DWC (compress + device apply, bit-exact). Prints ratios.

    python -m bench.dwc_codec [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load as st_load

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


def main(argv: list[str] | None = None) -> None:
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

    budget = len(fp32) // 20
    mirror = CloudMirror(base)
    t = time.perf_counter()
    update = compress(mirror, target, DWCConfig(bits="auto", budget_bytes=budget))
    compress_s = time.perf_counter() - t
    t = time.perf_counter()
    device = apply_update(base, update.payload, "v0", header=update.header)
    apply_s = time.perf_counter() - t
    exact = state_digest(device) == state_digest(update.result_state)

    print(f"adapter: {layers} layers, LoRA r=16, {params / 1e6:.1f} M parameters")
    print(f"fp32 downlink : {len(fp32):>12,} B   encode+decode {fp32_s:7.3f} s")
    print(
        f"DWC downlink  : {len(update.payload):>12,} B   compress {compress_s:7.3f} s, apply {apply_s:7.3f} s"
        f"   ({update.header.bits}-bit, {update.header.units_sent}/{update.header.units_total} units)"
    )
    print(f"bytes ratio DWC/fp32      : 1/{len(fp32) / len(update.payload):.1f}")
    print(f"time ratio DWC (compress+apply) / fp32 (encode+decode): {(compress_s + apply_s) / fp32_s:.1f}x")
    print(f"delta energy delivered    : {100 * update.sent_share:.1f}% (rest stays in the cloud residual)")
    print(f"device state == cloud mirror (bit-exact): {exact}")


if __name__ == "__main__":
    main()
