"""SparseVLM building blocks: config, raters, recycling."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from device.sparse import SparseConfig
from device.sparse.raters import NO_TEXT_AFTER_IMAGE, select_raters
from device.sparse.recycle import cluster_dpc_knn, merge_clusters, recycle_plan
from device.sparse.scoring import attention_rank


def test_default_pruning_layers_scale_with_depth() -> None:
    cfg = SparseConfig()
    assert cfg.pruning_layers(32) == [2, 6, 15]
    assert cfg.pruning_layers(2) == [0, 1]
    assert cfg.pruning_layers(1) == [0]
    assert SparseConfig(layers=[3, 1, 9]).pruning_layers(4) == [1, 3]
    assert SparseConfig(method="fastv").pruning_layers(2) == [1]
    assert SparseConfig(method="fastv").pruning_layers(32) == [2]


def test_budget_schedule_is_geometric_and_ends_at_budget() -> None:
    cfg = SparseConfig(budget=64)
    assert cfg.step_targets(576, 2) == [192, 64]
    counts = cfg.step_targets(576, 3)
    assert counts[-1] == 64 and counts == sorted(counts, reverse=True)
    assert SparseConfig(budget=900).step_targets(576, 2) == [576, 576]
    assert SparseConfig(schedule=[300, 100]).step_targets(576, 3) == [300, 100, 100]


@pytest.mark.parametrize(
    "bad",
    [
        {"budget": 0},
        {"layers": []},
        {"layers": [1, 1]},
        {"method": "random", "mode": "rank"},
        {"mode": "rank", "schedule": [10]},
        {"schedule": [10, 20]},
        {"rank_lambda": 0.0},
        {"unknown": 1},
    ],
)
def test_invalid_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SparseConfig.model_validate(bad)


def test_raters_never_empty_with_text_and_fallback_without() -> None:
    torch.manual_seed(0)
    embeds = torch.randn(12, 16)
    vis = torch.arange(2, 8)
    for n_text in (1, 2, 4):
        text = torch.arange(8, 8 + n_text)
        raters, fallback = select_raters(embeds, vis, text)
        assert fallback is None and 1 <= len(raters) <= n_text
        assert set(raters.tolist()) <= set(text.tolist())
    raters, fallback = select_raters(embeds, vis, torch.arange(0))
    assert len(raters) == 0 and fallback == NO_TEXT_AFTER_IMAGE


def test_raters_pick_the_visually_relevant_text() -> None:
    vis_dir = torch.zeros(8)
    vis_dir[0] = 1.0
    embeds = torch.zeros(6, 8)
    embeds[:3] = 4.0 * vis_dir  # visual tokens
    embeds[3] = 4.0 * vis_dir  # text aligned with the image
    embeds[4, 1] = 4.0  # unrelated text
    embeds[5, 2] = 4.0  # unrelated text
    raters, _ = select_raters(embeds, torch.arange(3), torch.arange(3, 6))
    assert raters.tolist() == [3]


def test_recycle_plan_respects_target() -> None:
    assert recycle_plan(64, 576, True, 0.3, 0.1) == int((int(0.3 * 512) + 1) * 0.1) + 1
    assert recycle_plan(64, 576, False, 0.3, 0.1) == 0
    assert recycle_plan(600, 576, True, 0.3, 0.1) == 0
    for target in range(1, 20):
        assert 0 <= recycle_plan(target, 20, True, 1.0, 1.0) < max(target, 1)


def test_dpc_knn_clusters_separated_groups() -> None:
    torch.manual_seed(0)
    a = torch.randn(10, 4) * 0.05
    b = torch.randn(10, 4) * 0.05 + 5.0
    x = torch.cat([a, b])
    labels = cluster_dpc_knn(x, 2, 3)
    assert len(set(labels[:10].tolist())) == 1 and len(set(labels[10:].tolist())) == 1
    assert labels[0] != labels[10]
    merged = merge_clusters(x, labels, 2)
    assert torch.allclose(merged[labels[0]], a.mean(0), atol=1e-6)
    assert torch.equal(cluster_dpc_knn(x, 2, 3), labels)  # deterministic


def test_attention_rank() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8]])
    assert attention_rank(p, 1e-4) == 2
    assert attention_rank(torch.eye(4), 1e-4) == 4
