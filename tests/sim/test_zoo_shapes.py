"""Shape members: the real checkpoints' geometry at a cut depth, random weights from a seed, real vocabulary sizes."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import ConfigError
from sim.zoo.shapes import SHAPES, model_config, processor_for, shape_by_name


def _meta_model(config):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def test_llava_7b_shape_has_llava_15_7b_geometry():
    recipe = SHAPES["llava-1.5-7b-shape"]()
    cfg = model_config(recipe.device, recipe.lm_layers, recipe.tower_layers)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (4096, 11008, 32, 32)
    assert t.vocab_size == 32064 and t.num_hidden_layers == 2
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.num_hidden_layers) == (1024, 4096, 16, 2)
    assert (v.image_size, v.patch_size, cfg.image_seq_length) == (336, 14, 576)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    model = _meta_model(cfg)
    assert model.lm_head.weight.shape == (32064, 4096)
    assert model.model.multi_modal_projector.linear_1.weight.shape == (4096, 1024)
    teacher = model_config(recipe.teacher, recipe.lm_layers, recipe.tower_layers).text_config
    assert (teacher.hidden_size, teacher.intermediate_size, teacher.num_attention_heads) == (5120, 13824, 40)


def test_qwen2_vl_shape_has_qwen2_vl_2b_geometry():
    recipe = SHAPES["qwen2-vl-2b-shape"]()
    cfg = model_config(recipe.device, 2, 2)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (1536, 8960, 12, 2)
    assert t.vocab_size == 151936 and cfg.image_token_id == 151655
    assert (v.embed_dim, v.hidden_size, v.num_heads, v.patch_size, v.spatial_merge_size) == (1280, 1536, 16, 14, 2)
    model = _meta_model(cfg)
    assert model.model.visual.merger.mlp[-1].out_features == 1536


def test_llava_shape_tokenizer_has_the_real_ids():
    tok = processor_for(SHAPES["llava-1.5-7b-shape"]().device).tokenizer
    assert len(tok) == 32002
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, 32000, 32001]
    ids = tok("USER: <image>\nwhat color is the square ? ASSISTANT:")["input_ids"]
    assert 32000 in ids and 0 not in ids  # every world word is in the vocabulary


def test_qwen2_vl_dynamic_resolution():
    import numpy as np

    proc = processor_for(SHAPES["qwen2-vl-2b-shape"]().device)
    assert len(proc.tokenizer) == 151657
    assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    grids = [proc.image_processor(images=[np.zeros((h, w, 3), np.uint8)], return_tensors="pt")["image_grid_thw"]
             for h, w in ((336, 336), (336, 448))]  # fmt: skip
    assert [g.tolist() for g in grids] == [[[1, 24, 24]], [[1, 24, 32]]]  # 144 and 192 tokens after 2x2 merging


def test_shape_settings_are_checked():
    assert shape_by_name("llava-1.5-7b-shape", ["lm_layers=4"]).lm_layers == 4
    with pytest.raises(ConfigError, match="unknown shape recipe"):
        shape_by_name("llava-9b-shape")
    with pytest.raises(ConfigError, match="lm_layers"):
        shape_by_name("llava-1.5-7b-shape", ["width=3"])
    with pytest.raises(ConfigError, match="invalid shape setting lm_layers"):
        shape_by_name("llava-1.5-7b-shape", ["lm_layers=0"])
    assert shape_by_name("llava-1.5-7b-shape", ["seed=1"]).digest() != shape_by_name("llava-1.5-7b-shape").digest()


@pytest.mark.slow
def test_qwen2_vl_shape_builds_deterministically_and_loads(tmp_path):
    from safetensors.torch import load_file

    from common.modeling import ImageTextProcessor, load_mllm
    from sim.zoo.shapes import ensure_shape

    recipe = shape_by_name("qwen2-vl-2b-shape", ["lm_layers=1", "tower_layers=1"])
    first = ensure_shape(recipe, home=tmp_path / "a")
    second = ensure_shape(recipe, home=tmp_path / "b")
    a, b = (
        load_file(next((first / "device").glob("*.safetensors"))),
        load_file(next((second / "device").glob("*.safetensors"))),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "zoo.json").read_text())["kind"] == "shape"
    loaded = load_mllm(first / "device")
    assert isinstance(loaded.processor, ImageTextProcessor)
    assert loaded.model.config.text_config.hidden_size == 1536
    assert loaded.model.generation_config.max_new_tokens == 16  # the agent's answer length for this member


def test_the_shape_fleet_scenario_configures_its_agents(tmp_path):
    from sim.fleet.devices import agent_config
    from sim.fleet.scenario import load_scenario
    from sim.fleet.zoo import resolve_zoo

    scenario = load_scenario("llava-7b-shape")
    assert scenario.zoo == "llava-1.5-7b-shape" and len(scenario.devices()) == 2
    cfg = agent_config(scenario.devices()[0], tmp_path, "127.0.0.1:1", scenario.agent)
    assert cfg.model.quantization == "4bit" and cfg.model.max_new_tokens == 4
    assert cfg.sparse.budget_kind == "layer_average" and cfg.sparse.budget_reference == 576
    with pytest.raises(ConfigError, match="has no teacher"):
        resolve_zoo("qwen2-vl-2b-shape")
