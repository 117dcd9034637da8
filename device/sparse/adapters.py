"""Model adapters: the only model-specific part of SparseVLM (where the decoder lives, how RoPE is applied).

A new decoder family (e.g. Qwen2-VL with M-RoPE) is another ``DecoderAdapter``; the pruning logic never
changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.errors import TandemError

# Language-model classes whose decoder layers share Llama's structure: input_layernorm,
# self_attn.{q,k}_proj with
# head_dim / scaling / num_key_value_groups, a model-level rotary_emb returning (cos, sin) and rotate-half
# RoPE.
_LLAMA_FAMILY = {"LlamaModel", "MistralModel", "Qwen2Model"}


class UnsupportedModelError(TandemError):
    """The model class has no SparseVLM adapter."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class DecoderAdapter:
    """Access to a Llama-family decoder inside a LLaVA model."""

    wrapper: nn.Module  # LlavaModel: sees input_ids, so it knows where the image tokens are
    language_model: nn.Module  # LlamaModel-like: embed_tokens, layers, norm, rotary_emb
    image_token_id: int

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return int(self.language_model.config.num_hidden_layers)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, n, head_dim], for the given (original) positions."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def text_positions(self, position_ids: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """[B, n] position of each token (what decode steps continue from)."""
        return position_ids.expand(b, n)

    def query_key(
        self, layer_idx: int, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Rotated queries of ``rows`` and keys of every token, as the layer computes them.

        ``normed`` [B, n, hidden] is the layer's input after ``input_layernorm``, ``rows`` [B, R]; returns
        q [B, heads, R, d], k [B, heads, n, d] (KV heads repeated for GQA) and the attention scaling.
        """
        attn = self.layers[layer_idx].self_attn
        d = attn.head_dim
        b, n, hidden = normed.shape
        picked = rows[..., None]
        q_in = normed.gather(1, picked.expand(b, rows.shape[1], hidden))
        q = attn.q_proj(q_in).view(b, rows.shape[1], -1, d).transpose(1, 2)
        k = attn.k_proj(normed).view(b, n, -1, d).transpose(1, 2)
        cos_q = cos.gather(1, picked.expand(b, rows.shape[1], d))[:, None]
        sin_q = sin.gather(1, picked.expand(b, rows.shape[1], d))[:, None]
        q = q * cos_q + _rotate_half(q) * sin_q
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        return q, k, float(attn.scaling)

    def input_norm(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer_idx].input_layernorm(hidden)


@dataclass
class Qwen2VLAdapter(DecoderAdapter):
    """Qwen2-VL: M-RoPE positions [3, B, n] (or [4, B, n] with text positions first); the rotary embedding
    recomposes them into ordinary (cos, sin) [B, n, d], so the decoder layers match Llama's."""

    def text_positions(self, position_ids: torch.Tensor, b: int, n: int) -> torch.Tensor:
        if position_ids.dim() == 3:
            position_ids = position_ids[0]
        return position_ids.expand(b, n)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return self.language_model.rotary_emb(hidden, position_ids)


# wrapper class -> (attribute path to the module that sees input_ids, adapter class, supported LM classes)
_SUPPORTED: dict[str, tuple[bool, type[DecoderAdapter], set[str]]] = {
    "LlavaForConditionalGeneration": (True, DecoderAdapter, _LLAMA_FAMILY),
    "LlavaModel": (False, DecoderAdapter, _LLAMA_FAMILY),
    "Qwen2VLForConditionalGeneration": (True, Qwen2VLAdapter, {"Qwen2VLTextModel"}),
    "Qwen2VLModel": (False, Qwen2VLAdapter, {"Qwen2VLTextModel"}),
}


def adapter_for(model: Any) -> DecoderAdapter:
    """The adapter for ``model`` or an ``UnsupportedModelError`` naming its class."""
    cls = type(model).__name__
    if cls not in _SUPPORTED:
        raise UnsupportedModelError(
            f"SparseVLM does not support model class {cls}; supported: {', '.join(sorted(_SUPPORTED))} "
            f"(LLaVA with a {'/'.join(sorted(_LLAMA_FAMILY))} language model)"
        )
    nested, adapter_cls, lm_classes = _SUPPORTED[cls]
    wrapper = model.model if nested else model
    lm = wrapper.language_model
    lm_cls = type(lm).__name__
    if lm_cls not in lm_classes:
        raise UnsupportedModelError(
            f"SparseVLM does not support language model class {lm_cls} inside {cls}; "
            f"supported: {', '.join(sorted(lm_classes))}"
        )
    window = getattr(lm.config, "sliding_window", None)
    if window is not None and getattr(lm.config, "use_sliding_window", True):
        raise UnsupportedModelError(
            f"SparseVLM supports full-attention layers only; {lm_cls} uses a sliding window "
            f"({lm.config.sliding_window}); set sliding_window=None"
        )
    layer_types = getattr(lm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"SparseVLM supports full-attention layers only; {lm_cls} has {set(layer_types)}")
    return adapter_cls(wrapper=wrapper, language_model=lm, image_token_id=int(model.config.image_token_id))
