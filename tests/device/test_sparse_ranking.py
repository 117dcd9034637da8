"""Tandem's ranking options: counts falling by ``step_ratio`` per pruning step under a layer-average budget, and
the redundancy discount (``diversity``) that keeps near-copies of one region out of the kept set."""

from __future__ import annotations

import pytest
import torch

from device.sparse import SparseConfig, enable_sparsevlm, sparse_stats
from device.sparse.diversity import diverse_order
from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.recipe import TextSpec, micro_recipe
from sim.zoo.tokenizer import build_processor, prompt_for

AVG64 = dict(budget=64, budget_kind="layer_average", budget_reference=576)


def test_step_ratio_counts_fall_by_the_ratio_and_meet_the_layer_average() -> None:
    cfg = SparseConfig(step_ratio=0.6, **AVG64)
    plan = cfg.plan(144, 2)  # 64 of 576 is 16 of 144; drops before layers 0 and 1
    assert plan == [20, 12]
    assert sum(plan) / len(plan) == 16
    deep = cfg.plan(144, 8)  # drops before layers 0, 2 and 4
    steps = sorted(set(deep), reverse=True)
    assert len(steps) == 3 and abs(sum(deep) / 8 - 16) <= 0.5
    assert all(abs(b / a - 0.6) < 0.1 for a, b in zip(steps, steps[1:], strict=False))
    # without a ratio the counts fall geometrically from the visual-token count: a far smaller final count
    assert SparseConfig(step_ratio=None, **AVG64).plan(144, 2)[-1] < plan[-1]


def test_defaults_are_tandems_and_parity_has_neither_option() -> None:
    default, parity = SparseConfig(), SparseConfig.paper_parity(64)
    assert (default.step_ratio, default.diversity) == (0.5, 2.0)
    assert parity.diversity == 0.0 and parity.schedule_fractions is not None  # its lists, not a ratio


def test_step_ratio_is_validated() -> None:
    with pytest.raises(ValueError):
        SparseConfig(step_ratio=0.0)
    with pytest.raises(ValueError):
        SparseConfig(diversity=-1.0)


def test_redundant_copies_fall_behind_new_content() -> None:
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    states = torch.stack([a, a * 2, b, a + 0.01 * b])[None]  # tokens 1 and 3 repeat token 0
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.7]])
    assert diverse_order(scores, states, 0.0, 4).tolist() == [[0, 1, 3, 2]]  # relevance alone
    assert diverse_order(scores, states, 2.0, 4).tolist()[0][:2] == [0, 2]  # the new region comes second
    # only the candidates are re-ranked; the rest keep their relevance order after them
    assert diverse_order(scores, states, 2.0, 2).tolist() == [[0, 1, 3, 2]]


@pytest.fixture(scope="module")
def micro():
    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    tok = processor.tokenizer
    text = TextSpec(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = build_llava(recipe.vision, text, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, 4)
    return model.eval(), processor


def _run(model, processor, cfg: SparseConfig, indices=(0, 1)):
    world = World(0, micro_recipe().vision.image_size)
    samples = [world.sample(i) for i in indices]
    enc = processor(
        images=[s.image for s in samples], text=[prompt_for(s.question) for s in samples], return_tensors="pt",
        padding=True,
    )  # fmt: skip
    enable_sparsevlm(model, cfg)
    with torch.no_grad():
        logits = model(**enc).logits
    return logits, sparse_stats(model).samples


def test_diversity_changes_the_kept_set_not_the_counts(micro) -> None:
    model, processor = micro
    plain = _run(model, processor, SparseConfig(budget=5, recycle=False, diversity=0.0))[1]
    diverse = _run(model, processor, SparseConfig(budget=5, recycle=False, diversity=4.0))[1]
    assert [s.layer_counts for s in plain] == [s.layer_counts for s in diverse]
    assert any(p.kept_patches != d.kept_patches for p, d in zip(plain, diverse, strict=True))


def test_diverse_batch_equals_single_runs(micro) -> None:
    """The batched prune (rows alike) and the per-sample prune (padded rows) rank alike."""
    model, processor = micro
    cfg = SparseConfig(budget=6, diversity=2.0, step_ratio=0.6)
    batch, stats = _run(model, processor, cfg, (0, 1))
    for i in range(2):
        single, single_stats = _run(model, processor, cfg, (i,))
        n = single.shape[1]
        assert torch.allclose(batch[i, -n:], single[0], atol=1e-5)
        assert single_stats[0].kept_patches == stats[i].kept_patches
