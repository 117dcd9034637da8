"""The transformers internals SparseVLM relies on (``device.sparse.adapters.INTERNALS``), each checked by name
on every supported decoder family: a transformers release that moves one fails here, naming it."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from device.sparse.adapters import (
    CACHE_NAMES,
    INTERNALS,
    adapter_for,
    cache_argument,
    model_output,
    output_cache,
    pop_cache,
)
from sim.zoo.architecture import vision_config
from sim.zoo.recipe import micro_recipe

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _llava(text_config) -> LlavaForConditionalGeneration:
    cfg = LlavaConfig(
        vision_config=vision_config(micro_recipe().vision),
        text_config=text_config,
        image_token_index=63,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def _qwen2vl() -> Qwen2VLForConditionalGeneration:
    text = dict(SIZES, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=60, video_token_id=61)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).eval()


FAMILIES = {
    "llama": lambda: _llava(LlamaConfig(**SIZES)),
    "qwen2": lambda: _llava(Qwen2Config(**SIZES)),
    "mistral": lambda: _llava(MistralConfig(sliding_window=None, **SIZES)),
    "qwen2vl": _qwen2vl,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def adapter(request):
    return adapter_for(FAMILIES[request.param]())


@pytest.mark.parametrize("internal", INTERNALS, ids=[i.name for i in INTERNALS])
def test_internal_holds(adapter, internal) -> None:
    internal.check(adapter)


def test_internals_are_named_once() -> None:
    names = [i.name for i in INTERNALS]
    assert len(names) == len(set(names)) and all(names)


def test_cache_argument_follows_the_signature() -> None:
    def new_style(hidden, cache=None, **kwargs): ...

    def old_style(hidden, past_key_values=None, **kwargs): ...

    def neither(hidden, **kwargs): ...

    assert cache_argument(new_style) == "cache"
    assert cache_argument(old_style) == "past_key_values"
    with pytest.raises(Exception, match="no KV cache argument"):
        cache_argument(neither)


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_pop_cache_accepts_either_name(name: str) -> None:
    marker = object()
    kwargs = {name: marker, "other": 1}
    assert pop_cache(kwargs) is marker and kwargs == {"other": 1}
    assert pop_cache({}) is None
    with pytest.raises(ValueError, match="once"):
        pop_cache({"cache": marker, "past_key_values": object()})


def test_model_output_round_trip() -> None:
    marker = object()
    out = model_output(torch.zeros(1, 2, 3), marker)
    assert output_cache(out) is marker and out.last_hidden_state.shape == (1, 2, 3)
