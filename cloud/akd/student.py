"""The student: the device's model with LoRA adapters on the language model and on the projector (peft).

Only adapter weights train; they are exported in PEFT format (``adapter_model.safetensors`` +
``adapter_config.json``, loadable by ``PeftModel.from_pretrained``) and as a state dict for DWC.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict

from common.adapters import LM_TARGETS, PROJECTOR_TARGETS, AdapterConfig, add_lora, lora_config

__all__ = [
    "LM_TARGETS",
    "PROJECTOR_TARGETS",
    "AdapterConfig",
    "adapter_state",
    "build_student",
    "export_adapter",
    "lora_config",
]


def build_student(device_model: torch.nn.Module, config: AdapterConfig) -> PeftModel:
    """A PeftModel over a private copy of the device model; only LoRA weights require grad."""
    base = copy.deepcopy(device_model)
    base.requires_grad_(False)
    return add_lora(base, config)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter weights (PEFT key names) as detached fp32 copies."""
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


def export_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write the adapter in PEFT format; returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    return path
