"""The LoRA shape that device and cloud share: one definition, so the device's v0 adapter equals the cloud's.

Both sides wrap the same device model with the same ``LoraConfig``, then ``add_lora`` draws every ``lora_A`` from a
seeded fp32 generator (peft's kaiming-uniform bound; ``lora_B`` starts at zero): the cloud's mirror of version 0 is
the device's state bit for bit whatever either side's dtype or quantization. (peft initialises in fp32 and then
casts to a float base layer's dtype: an fp16 device and an fp32 cloud would hold different version-0 bits.)
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from pydantic import Field

from common.config import StrictConfig

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r"(.*multi_modal_projector\.(linear_1|linear_2))|(.*visual\.merger\.mlp\.(0|2))"
"""The projector's linears: LLaVA's ``multi_modal_projector``, Qwen2-VL's patch merger MLP."""


class AdapterConfig(StrictConfig):
    """LoRA shape of the device model's adapters."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    projector_adapter: bool = True
    seed: int = 0


def lora_config(config: AdapterConfig) -> LoraConfig:
    """The peft LoraConfig: language-model projections, plus the projector's two linears if enabled."""
    target = f"({LM_TARGETS})|({PROJECTOR_TARGETS})" if config.projector_adapter else LM_TARGETS
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target,
        bias="none",
    )


def add_lora(model: torch.nn.Module, config: AdapterConfig) -> PeftModel:
    """Wrap ``model`` (in place) with freshly initialised LoRA adapters, seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config(config))
    init_lora(peft_model, config.seed)
    return peft_model


@torch.no_grad()
def init_lora(model: torch.nn.Module, seed: int) -> None:
    """``lora_A`` ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5), as peft) from one fp32 generator
    in module-name order, ``lora_B`` = 0; adapter weights kept in fp32 (what peft's adapter autocast keeps)."""
    gen = torch.Generator().manual_seed(seed)
    for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if not isinstance(module, LoraLayer):
            continue
        for name in sorted(module.lora_A):
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            fresh = torch.empty(a.shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=gen) / math.sqrt(a.shape[1])
            a.data = fresh.to(a.device)
            b.data = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
