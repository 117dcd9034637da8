"""The LoRA shape that device and cloud share: one definition, so the device's v0 adapter equals the cloud's.

Both sides seed torch and wrap the same device model with the same ``LoraConfig``; peft's initialisation is then
identical, and the cloud's mirror of version 0 is the device's state bit for bit.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import Field

from common.config import StrictConfig

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r".*multi_modal_projector\.(linear_1|linear_2)"


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
    return get_peft_model(model, lora_config(config))
