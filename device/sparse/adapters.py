"""Model adapters: the only part of SparseVLM that touches transformers' internals.

Where the decoder lives, how RoPE is applied, how a decoder layer is called, what the KV cache argument is
called and how a model output is built all live here; ``engine.py`` and ``plugin.py`` go through the adapter.
``INTERNALS`` names every internal relied on, with a check; ``tests/device/test_sparse_adapters.py`` runs each
check on every supported family, so a transformers release that changes one fails there, by name.

A new decoder family (e.g. Qwen2-VL with M-RoPE) is another ``DecoderAdapter``; the pruning logic never
changes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from common.errors import TandemError

# Language-model classes whose decoder layers share Llama's structure: input_layernorm,
# self_attn.{q,k}_proj with
# head_dim / scaling / num_key_value_groups, a model-level rotary_emb returning (cos, sin) and rotate-half
# RoPE.
_LLAMA_FAMILY = {"LlamaModel", "MistralModel", "Qwen2Model"}


# transformers <= 5.23 names the KV cache ``past_key_values`` in every decoder forward and model output;
# 5.24 renamed it ``cache`` (the old name survives as a deprecated alias that logs a warning on decoder
# layers, and is dropped silently by a replaced language-model forward that only knows the old name).
CACHE_NAMES = ("cache", "past_key_values")


class UnsupportedModelError(TandemError):
    """The model class has no SparseVLM adapter."""


def cache_argument(forward: Callable[..., Any]) -> str:
    """Name under which ``forward`` (a decoder layer's or language model's) takes the KV cache."""
    params = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{getattr(forward, '__qualname__', forward)} takes no KV cache argument (expected one of {CACHE_NAMES})"
    )


_OUTPUT_CACHE_FIELD = next(
    name for name in CACHE_NAMES if name in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
)


def model_output(hidden: torch.Tensor, cache: Any) -> BaseModelOutputWithPast:
    """A language-model output carrying ``cache`` under the installed transformers' field name."""
    return BaseModelOutputWithPast(last_hidden_state=hidden, **{_OUTPUT_CACHE_FIELD: cache})


def output_cache(output: Any) -> Any:
    """The KV cache of a model output (either field name)."""
    return getattr(output, _OUTPUT_CACHE_FIELD)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the KV cache from a forward's keyword arguments, under whichever name the caller used."""
    found = [kwargs.pop(name) for name in CACHE_NAMES if name in kwargs]
    found = [c for c in found if c is not None]
    if len(found) > 1:
        raise ValueError(f"pass the KV cache once (got both of {CACHE_NAMES})")
    return found[0] if found else None


def new_cache(config: Any) -> DynamicCache:
    """An empty dynamic cache for the language model."""
    return DynamicCache(config=config)


def set_logical_length(cache: Any, length: Callable[[], int]) -> None:
    """Make ``cache.get_seq_length`` report ``length()`` (layers of a sparse cache hold different counts)."""
    cache.get_seq_length = lambda *_args, **_kwargs: length()


def cached_lengths(cache: Any) -> list[int]:
    """Tokens held by each layer of a dynamic cache."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values held by a dynamic cache."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class DecoderAdapter:
    """Access to a Llama-family decoder inside a LLaVA model."""

    wrapper: nn.Module  # LlavaModel: sees input_ids, so it knows where the image tokens are
    language_model: nn.Module  # LlamaModel-like: embed_tokens, layers, norm, rotary_emb
    image_token_id: int
    layer_cache_arg: str = "past_key_values"  # what the decoder layers call the KV cache

    def run_layer(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """One decoder layer, called as the model's own forward calls it (returns the hidden states)."""
        return self.layers[layer_idx](
            hidden,
            attention_mask=mask,
            position_embeddings=cos_sin,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self.layer_cache_arg: cache},
        )

    def dense_forward(self, **kwargs: Any) -> Any:
        """The language model's own (class) forward, the KV cache passed under its own name."""
        lm = self.language_model
        cache = pop_cache(kwargs)
        kwargs[cache_argument(type(lm).forward)] = cache
        return type(lm).forward(lm, **kwargs)

    def cls_layer(self) -> nn.Module:
        """The CLIP encoder layer that produces the LLM's image features (VisionZip reads its CLS attention).

        ``UnsupportedModelError`` for towers without a CLS token or features that keep it.
        """
        tower = getattr(self.wrapper, "vision_tower", None)
        body = getattr(tower, "vision_model", tower)  # transformers 5: the encoder sits on CLIPVisionModel itself
        layers = getattr(getattr(body, "encoder", None), "layers", None)
        cfg = self.wrapper.config
        feature_layer = getattr(cfg, "vision_feature_layer", None)
        if layers is None or not isinstance(feature_layer, int):
            raise UnsupportedModelError(
                f"VisionZip needs a CLIP-style vision tower with one feature layer; {type(self.wrapper).__name__} "
                f"has {type(tower).__name__}"
            )
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("VisionZip needs vision_feature_select_strategy 'default' (CLS dropped)")
        return layers[len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1]

    @staticmethod
    def cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Head-mean attention of the CLS token over the patches, [B, n_patches], from the layer's input."""
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden)
        b, n, _ = normed.shape
        heads, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(normed[:, :1]).view(b, 1, heads, d).transpose(1, 2)
        k = attn.k_proj(normed).view(b, n, heads, d).transpose(1, 2)
        weights = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
        return weights.mean(dim=1)[:, 0, 1:]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden)

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

    def rotary_plain(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for plain 1D positions [B, n] (used when positions are renumbered)."""
        return self.rotary(hidden, positions)

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

    def rotary_plain(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(hidden, positions[None].expand(3, *positions.shape))


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
    return adapter_cls(
        wrapper=wrapper,
        language_model=lm,
        image_token_id=int(model.config.image_token_id),
        layer_cache_arg=cache_argument(type(lm.layers[0]).forward),
    )


# ---- The transformers internals SparseVLM relies on, each with a check on a live model ---------------------


@dataclass(frozen=True)
class Internal:
    """One transformers internal the engine relies on; ``check(adapter)`` raises AssertionError if it broke."""

    name: str
    check: Callable[[DecoderAdapter], None]


def _check_modules(ad: DecoderAdapter) -> None:
    lm = ad.language_model
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb", "config"):
        assert hasattr(lm, attr), f"{type(lm).__name__} has no .{attr}"
    attn = ad.layers[0].self_attn
    for attr in ("q_proj", "k_proj", "head_dim", "scaling", "num_key_value_groups"):
        assert hasattr(attn, attr), f"{type(attn).__name__} has no .{attr}"
    assert hasattr(ad.layers[0], "input_layernorm"), "decoder layer has no .input_layernorm"


def _check_rotary(ad: DecoderAdapter) -> None:
    lm = ad.language_model
    hidden = torch.zeros(2, 5, lm.config.hidden_size)
    pos = torch.arange(5)[None].expand(2, 5)
    cos, sin = ad.rotary(hidden, pos if not isinstance(ad, Qwen2VLAdapter) else pos[None].expand(3, 2, 5))
    d = ad.layers[0].self_attn.head_dim
    assert cos.shape == sin.shape == (2, 5, d), f"rotary_emb returned {tuple(cos.shape)}, expected (2, 5, {d})"


def _check_rope_rule(ad: DecoderAdapter) -> None:
    """The adapter's rotate-half RoPE equals the modeling module's ``apply_rotary_pos_emb``."""
    module = inspect.getmodule(type(ad.layers[0]))
    apply = getattr(module, "apply_rotary_pos_emb", None) or module.apply_multimodal_rotary_pos_emb
    d = ad.layers[0].self_attn.head_dim
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, d, generator=gen)
    cos, sin = torch.randn(1, 3, d, generator=gen), torch.randn(1, 3, d, generator=gen)
    ours = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    if apply.__name__ == "apply_multimodal_rotary_pos_emb":
        return  # Qwen2-VL recomposes M-RoPE inside rotary_emb; the layers apply plain rotate-half
    theirs, _ = apply(q, q, cos, sin)
    assert torch.allclose(ours, theirs, atol=1e-6), "apply_rotary_pos_emb is no longer rotate-half RoPE"


def _check_layer_call(ad: DecoderAdapter) -> None:
    """A decoder layer called with a boolean 4D mask, (cos, sin) and a cache returns hidden states and
    appends exactly its own tokens to its cache layer."""
    lm = ad.language_model
    n = 4
    hidden = torch.randn(1, n, lm.config.hidden_size)
    pos = torch.arange(n)[None]
    cos_sin = ad.rotary(hidden, pos if not isinstance(ad, Qwen2VLAdapter) else pos[None].expand(3, 1, n))
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    cache = new_cache(lm.config)
    with torch.no_grad():
        out = ad.run_layer(0, hidden, mask, cos_sin, pos, cache)
    assert isinstance(out, torch.Tensor), f"decoder layer returned {type(out).__name__}, not a tensor"
    assert out.shape == hidden.shape
    assert cached_lengths(cache)[0] == n, "the decoder layer did not append its tokens to the cache"


def _check_cache_argument(ad: DecoderAdapter) -> None:
    layer_arg = cache_argument(type(ad.layers[0]).forward)
    lm_arg = cache_argument(type(ad.language_model).forward)
    assert layer_arg == ad.layer_cache_arg, f"decoder layers take the cache as {layer_arg!r}"
    assert lm_arg in CACHE_NAMES


def _check_output_field(_ad: DecoderAdapter) -> None:
    cache = new_cache(_ad.language_model.config)
    out = model_output(torch.zeros(1), cache)
    assert output_cache(out) is cache and out.last_hidden_state is not None


def _check_cache_length_override(ad: DecoderAdapter) -> None:
    cache = new_cache(ad.language_model.config)
    set_logical_length(cache, lambda: 7)
    assert cache.get_seq_length() == 7 and cache.get_seq_length(0) == 7


def _check_config(ad: DecoderAdapter) -> None:
    cfg = ad.language_model.config
    assert hasattr(cfg, "num_hidden_layers") and hasattr(cfg, "hidden_size")
    assert ad.image_token_id >= 0
    assert hasattr(ad.wrapper, "language_model"), "the multimodal wrapper has no .language_model"


def _check_cls_layer(ad: DecoderAdapter) -> None:
    if isinstance(ad, Qwen2VLAdapter):
        return  # no CLS token: VisionZip is refused with UnsupportedModelError there
    layer = ad.cls_layer()
    for attr in ("layer_norm1", "self_attn"):
        assert hasattr(layer, attr), f"{type(layer).__name__} has no .{attr}"
    for attr in ("q_proj", "k_proj", "num_heads", "head_dim", "scale"):
        assert hasattr(layer.self_attn, attr), f"{type(layer.self_attn).__name__} has no .{attr}"
    width = layer.layer_norm1.normalized_shape[0]
    scores = ad.cls_attention(layer, torch.randn(2, 5, width))
    assert scores.shape == (2, 4) and torch.allclose(scores.sum(-1) < 1.0, torch.ones(2, dtype=torch.bool))


INTERNALS: tuple[Internal, ...] = (
    Internal("modules: lm.{embed_tokens,layers,norm,rotary_emb}, self_attn.{q_proj,k_proj,...}", _check_modules),
    Internal("rotary_emb(hidden, position_ids) -> (cos, sin) [B, n, head_dim]", _check_rotary),
    Internal("RoPE is rotate-half: apply_rotary_pos_emb(q, k, cos, sin)", _check_rope_rule),
    Internal("decoder layer(h, attention_mask=bool 4D, position_embeddings, cache) -> Tensor", _check_layer_call),
    Internal("KV cache argument name: `cache` (>= 5.24) or `past_key_values` (<= 5.23)", _check_cache_argument),
    Internal("BaseModelOutputWithPast carries the cache as `cache` or `past_key_values`", _check_output_field),
    Internal("DynamicCache(config=...).get_seq_length can be overridden per instance", _check_cache_length_override),
    Internal("config: wrapper.language_model, image_token_id, num_hidden_layers", _check_config),
    Internal("CLIP layer: vision_tower.encoder.layers[f], layer_norm1, self_attn.{q,k}_proj, scale", _check_cls_layer),
)
