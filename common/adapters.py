"""The LoRA shape that device and cloud share: one definition, so the device's v0 adapter equals the cloud's.

Both sides wrap the same device model with the same ``LoraConfig``, then ``add_lora`` draws every ``lora_A`` from a
seeded fp32 generator (peft's kaiming-uniform bound; ``lora_B`` starts at zero): the cloud's mirror of version 0 is
the device's state bit for bit whatever either side's dtype or quantization. (peft initialises in fp32 and then
casts to a float base layer's dtype: an fp16 device and an fp32 cloud would hold different version-0 bits.)
"""

from __future__ import annotations

import copy
import math
import re

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


def clone_adapter(layer: LoraLayer, source: str, slot: str) -> None:
    """Give ``layer`` a further adapter ``slot``: copies of ``source``'s LoRA modules and settings (every
    per-adapter attribute peft declares for the layer: ``adapter_layer_names`` and ``other_param_names``). Costs
    the same whatever the number of adapters (peft's ``update_layer`` walks all of them), frozen."""
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        table = getattr(layer, attr, None)
        if table is None or source not in table:
            continue
        value = table[source]
        if isinstance(value, torch.nn.Module):
            value = copy.deepcopy(value).requires_grad_(False)
        table[slot] = value


class RowAdapters:
    """One batched forward in which every row runs with its own LoRA adapter (peft's mixed-adapter batches,
    requested layer by layer): the language model's LoRA layers see rows ``[B, T, H]`` and take ``names[b]`` for
    row ``b``; the projector (LLaVA's projector, Qwen2-VL's patch merger: ``PROJECTOR_TARGETS``) runs once per
    sample (``select(i)`` before it) and takes ``names[i]`` for all its tokens. Use as a context manager around
    the forward; the hooks are gone after it."""

    def __init__(self, layers: list[tuple[str, LoraLayer]], names: list[str]) -> None:
        self.names = list(names)
        self._sample = 0
        self._handles: list = []
        self._layers = layers

    @staticmethod
    def layers_of(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
        """The model's LoRA layers by name (find them once: a model with many adapters has many modules)."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

    def select(self, sample: int) -> None:
        """The sample whose features the projector is about to see."""
        self._sample = sample

    def _projector_hook(self, module, args, kwargs):
        kwargs["adapter_names"] = [self.names[self._sample]] * int(args[0].shape[0])
        return args, kwargs

    def _row_hook(self, module, args, kwargs):
        rows = int(args[0].shape[0])
        if rows != len(self.names):
            raise ValueError(f"a LoRA layer saw {rows} rows for {len(self.names)} adapter names")
        kwargs["adapter_names"] = self.names
        return args, kwargs

    def __enter__(self) -> RowAdapters:
        for name, module in self._layers:
            hook = self._projector_hook if re.fullmatch(PROJECTOR_TARGETS, name) else self._row_hook
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
