"""Tandem's ranking: the kept tokens chosen by relevance-weighted max-min diversity (``relevance_weight``), and
counts falling by ``step_ratio`` per pruning step under a layer-average budget."""

from __future__ import annotations

import pytest
import torch
from sparse_support import run_sparse, tiny_llava

from device.sparse import SparseConfig
from device.sparse.diversity import weighted_maxmin_order
from sim.zoo.recipe import TextSpec, micro_recipe

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
    # the default: counts fall geometrically from the visual-token count, leaving fewer in the last layer
    assert SparseConfig(**AVG64).plan(144, 2)[-1] < plan[-1]


def test_defaults_are_tandems_and_parity_keeps_the_most_relevant() -> None:
    default, parity = SparseConfig(), SparseConfig.paper_parity(64)
    assert default.relevance_weight == 1.0 and default.step_ratio is None
    assert parity.relevance_weight is None and parity.schedule_fractions is not None


@pytest.mark.parametrize("bad", [{"step_ratio": 0.0}, {"step_ratio": 1.5}, {"relevance_weight": -1.0}])
def test_ranking_options_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        SparseConfig(**bad)


def test_relevance_weighted_maxmin_covers_regions_the_text_cares_about() -> None:
    a, b, c = torch.eye(3)
    # tokens 1 and 3 repeat token 0's region; token 2 is a second region; token 4 a third, barely relevant
    states = torch.stack([a, a * 2, b, a + 0.01 * b, c])[None]
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.7, 0.01]])
    order = weighted_maxmin_order(scores, states, 1.0, 3)
    assert order[0, :2].tolist() == [0, 2]  # the most relevant, then the new region, not a copy of the first
    assert sorted(order[0].tolist()) == list(range(5))  # a permutation: the rest follow by relevance
    assert order[0, 3:].tolist() == [x for x in [0, 1, 3, 2, 4] if x not in order[0, :3].tolist()]
    # a heavy weight on relevance prefers the relevant copy to the irrelevant third region
    assert 4 not in weighted_maxmin_order(scores, states, 8.0, 3)[0, :3].tolist()
    # weight 0: max-min diversity alone reaches the third region too
    assert set(weighted_maxmin_order(scores, states, 0.0, 3)[0, :3].tolist()) == {0, 2, 4}


def test_exact_duplicates_are_never_picked_twice() -> None:
    states = torch.ones(1, 4, 3)  # every token identical: all distances 0
    order = weighted_maxmin_order(torch.tensor([[0.4, 0.3, 0.2, 0.1]]), states, 1.0, 3)
    assert sorted(order[0].tolist()) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def micro():
    text = TextSpec(hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return tiny_llava(micro_recipe().vision, text)


def _run(model, processor, cfg: SparseConfig, indices=(0, 1)):
    _, out, stats = run_sparse(model, processor, cfg, indices)
    return out.logits, stats


def test_weighting_changes_the_kept_set_not_the_counts(micro) -> None:
    model, processor = micro
    plain = _run(model, processor, SparseConfig(budget=5, recycle=False, relevance_weight=None))[1]
    diverse = _run(model, processor, SparseConfig(budget=5, recycle=False, relevance_weight=0.0))[1]
    assert [s.layer_counts for s in plain] == [s.layer_counts for s in diverse]
    assert any(p.kept_patches != d.kept_patches for p, d in zip(plain, diverse, strict=True))


@pytest.mark.parametrize("step_ratio", [None, 0.6])
def test_batched_and_per_sample_prunes_choose_alike(micro, step_ratio) -> None:
    """Rows alike take the batched prune, padded rows the per-sample one: both choose the same tokens."""
    model, processor = micro
    cfg = SparseConfig(budget=6, budget_kind="layer_average", step_ratio=step_ratio)
    batch, stats = _run(model, processor, cfg, (0, 1))
    for i in range(2):
        single, single_stats = _run(model, processor, cfg, (i,))
        n = single.shape[1]
        assert torch.allclose(batch[i, -n:], single[0], atol=1e-5)
        assert single_stats[0].kept_patches == stats[i].kept_patches
