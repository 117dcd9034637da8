"""The student: the device's model with LoRA adapters on the language model and on the projector (peft).

Only adapter weights train; they are exported in PEFT format (``adapter_model.safetensors`` +
``adapter_config.json``, loadable by ``PeftModel.from_pretrained``) and as a state dict for DWC.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from pydantic import Field

from common.config import StrictConfig

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r".*multi_modal_projector\.(linear_1|linear_2)"


class AdapterConfig(StrictConfig):
    """LoRA shape of the student's adapters."""

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


def build_student(device_model: torch.nn.Module, config: AdapterConfig) -> PeftModel:
    """A PeftModel over a private copy of the device model; only LoRA weights require grad."""
    torch.manual_seed(config.seed)
    base = copy.deepcopy(device_model)
    base.requires_grad_(False)
    model = get_peft_model(base, lora_config(config))
    return model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter weights (PEFT key names) as detached fp32 copies."""
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


def export_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write the adapter in PEFT format; returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    return path
