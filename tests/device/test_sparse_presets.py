"""Issue 20: the merged-token count, the paper-parity preset against Tandem's defaults, budgets stated both
ways, and the VisionZip- and DivPrune-style baselines in the same engine."""

from __future__ import annotations

import pytest
import torch
from sparse_support import run_sparse, tiny_llava

from device.sparse import SparseConfig, UnsupportedModelError, enable_sparsevlm
from device.sparse.config import REFERENCE_KEPT_LISTS, reference_counts
from device.sparse.raters import select_raters
from device.sparse.recycle import cluster_dpc_knn_batch, groups_for, recycle_plan, recycled_count
from sim.world import World
from sim.zoo.recipe import TextSpec, VisionSpec, micro_recipe
from sim.zoo.tokenizer import prompt_for

# 96 px / patch 4: LLaVA-1.5's 576 visual tokens, on a tower and LM small enough for a test
VISION576 = VisionSpec(image_size=96, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TEXT = TextSpec(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def model576():
    return tiny_llava(VISION576, TEXT)


@pytest.fixture(scope="module")
def micro():
    return tiny_llava(micro_recipe().vision, TEXT)


def test_merged_token_count_follows_the_recycled_count() -> None:
    # the released code at 64: 66 kept of 576, 510 pruned, 154 recycled, 16 merged -> 82
    assert recycle_plan(82, 576, True, 0.3, 0.1) == 16
    assert reference_counts(64) == [82, 32, 18]
    assert reference_counts(128) == [312, 117, 39] and reference_counts(192) == [309, 204, 113]
    for n_visual in (16, 144, 576):
        for target in range(2, n_visual):
            g = recycle_plan(target, n_visual, True, 0.3, 0.1)
            assert g == target - 1 or g == groups_for(recycled_count(n_visual - (target - g), 0.3), 0.1)


def test_engine_merges_as_many_tokens_as_the_reference(model576) -> None:
    model, processor = model576
    _, _, samples = run_sparse(model, processor, SparseConfig(schedule=[82], layers=[1]))
    for s in samples:
        (step,) = s.steps
        assert (step.before, step.after, step.merged) == (576, 82, 16)  # 66 kept + 16 merged
        assert s.layer_counts == [576, 82, 82, 82]


def test_parity_preset_and_defaults_differ_where_documented(model576) -> None:
    model, processor = model576
    tandem = SparseConfig(budget=64, budget_kind="layer_average", budget_reference=576)
    parity = SparseConfig.paper_parity(64)
    seen: list[torch.Tensor] = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True
    )
    enc, _, t_samples = run_sparse(model, processor, tandem)
    _, _, p_samples = run_sparse(model, processor, parity)
    hook.remove()
    n_layers = TEXT.num_layers
    assert tandem.drop_layers(n_layers) == [0, 1, 2] and parity.drop_layers(n_layers) == [1, 2, 3]
    embeds = seen[0]  # the language model's input: projected image features and text embeddings
    image = enc["input_ids"] == model.config.image_token_id
    for i, (t, p) in enumerate(zip(t_samples, p_samples, strict=True)):
        # prune point: Tandem's first layer already runs pruned, the reference's runs on all 576
        assert t.layer_counts[0] < 576 and p.layer_counts[0] == 576
        # kept lists: the released code's counts (layers 2/6/15 of 32 scaled to 0/1/2 of 4), merged included
        assert p.layer_counts == parity.plan(576, n_layers) == [576, 82, 32, 18]
        assert [st.merged for st in p.steps] == [16, 2, 1]
        # raters: unscaled relevance with '>' (released) vs scaled with '>='
        vis = torch.nonzero(image[i]).flatten()
        text = torch.arange(int(vis[-1]) + 1, enc["input_ids"].shape[1])
        text = text[enc["attention_mask"][i, text].bool()]
        assert p.raters == select_raters(embeds[i], vis, text, scaled=False, strict=True)[0].tolist()
        assert t.raters == select_raters(embeds[i], vis, text)[0].tolist()
        # positions and merged placement
        t_pos = [pos for pos, _ in t.final_visual]
        assert t_pos == sorted(t_pos) and len(set(t_pos)) == len(t_pos)  # original ids, merged at a member
        assert any(orig == -1 for _, orig in t.final_visual)
        p_pos = [pos for pos, _ in p.final_visual]
        assert p_pos == list(range(p_pos[0], p_pos[0] + len(p_pos)))  # renumbered
        merged = [orig == -1 for _, orig in p.final_visual]
        assert merged == sorted(merged) and merged[-1]  # merged tokens after the kept block


def test_density_including_self_is_the_released_rule() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 40, 8)
    ours = cluster_dpc_knn_batch(x, 5, 5)
    released = cluster_dpc_knn_batch(x, 5, 5, include_self=True)
    assert ours.shape == released.shape == (2, 40)
    assert set(released[0].tolist()) == set(range(5))
    assert not torch.equal(ours, released)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_layer_average_budget_is_reported_both_ways(micro, budget: int) -> None:
    model, processor = micro
    cfg = SparseConfig(budget=budget, budget_kind="layer_average", budget_reference=576)
    _, _, samples = run_sparse(model, processor, cfg)
    plan = cfg.plan(16, TEXT.num_layers)
    target = budget * 16 / 576
    assert abs(sum(plan) / len(plan) - target) <= 1.0
    for s in samples:
        assert s.layer_counts == plan
        assert s.mean_count == pytest.approx(sum(plan) / len(plan)) and s.final_count == plan[-1]
    assert SparseConfig(budget=budget, budget_reference=576).plan(16, 4)[-1] == round(budget * 16 / 576)


def test_visionzip_keeps_dominant_tokens_by_cls_attention(micro) -> None:
    model, processor = micro
    world = World(0, 32)
    enc = processor(images=[world.sample(0).image], text=[prompt_for(world.sample(0).question)], return_tensors="pt")
    tower = model.model.vision_tower
    previous, tower.config._attn_implementation = tower.config._attn_implementation, "eager"
    with torch.no_grad():
        vt = tower(enc["pixel_values"], output_attentions=True)
    tower.config._attn_implementation = previous
    assert len(vt.attentions) == micro_recipe().vision.num_layers
    _, _, (s,) = run_sparse(model, processor, SparseConfig(method="visionzip", budget=7), indices=(0,))
    layer = len(vt.attentions) - 2  # vision_feature_layer -2
    cls = vt.attentions[layer][0, :, 0, 1:].mean(dim=0)
    assert torch.allclose(s.visual_scores, cls, atol=1e-5)
    assert s.layer_counts == [7] * TEXT.num_layers
    assert s.steps[0].merged == 1  # 6 dominant + 1 contextual
    dominant = set(cls.topk(6).indices.tolist())
    assert dominant <= set(s.kept_patches)


def test_divprune_picks_a_max_min_diverse_set(micro) -> None:
    model, processor = micro
    enc, _, (s,) = run_sparse(model, processor, SparseConfig(method="divprune", budget=5), indices=(0,))
    x = model.model.get_image_features(pixel_values=enc["pixel_values"], return_dict=True).pooler_output
    x = torch.cat(list(x)) if isinstance(x, (list, tuple)) else x.reshape(-1, x.shape[-1])
    xn = torch.nn.functional.normalize(x, dim=-1)
    dist = 1 - xn @ xn.T
    chosen = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())]
    while len(chosen) < 5:
        chosen.append(int(dist[chosen].min(dim=0).values.argmax()))
    assert s.kept_patches == sorted(chosen)
    assert s.layer_counts == [5] * TEXT.num_layers and s.steps[0].merged == 0


def test_visionzip_needs_a_cls_tower() -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    rope = {"rope_type": "default", "mrope_section": [2, 1, 1]}
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters=rope)  # fmt: skip
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=60))
    with pytest.raises(UnsupportedModelError, match="VisionZip"):
        enable_sparsevlm(model, SparseConfig(method="visionzip"))


def test_parity_preset_rejects_unknown_budget() -> None:
    with pytest.raises(ValueError, match="kept lists"):
        SparseConfig.paper_parity(100)
    assert set(REFERENCE_KEPT_LISTS) == {192, 128, 96, 64}
