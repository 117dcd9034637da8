"""UTS: uncertainty scores, the budget gate, token selection, the upload codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.sample_codec import UploadSample, decode_sample, encode_sample
from common.tensor_pack import PayloadError, pack
from device.uts import (
    BudgetGate,
    GateConfig,
    SourceFeatureStats,
    answer_uncertainty,
    select_tokens,
    token_priority,
    uncertainty_score,
)


def test_uncertainty_scores_order_peaked_and_flat_answers():
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    flat = torch.zeros(1, 4)
    u = answer_uncertainty(torch.cat([peaked, flat]))
    assert u.confidence[0] > 0.99 and u.confidence[1] == pytest.approx(0.25)
    assert u.entropy[1] == pytest.approx(1.0) and u.entropy[0] < 0.01
    assert u.energy[0] < u.energy[1]  # confident (large logit) = low energy
    for kind in ("confidence", "entropy", "combined"):
        s = uncertainty_score(u, kind)
        assert s[1] > s[0]
    seq = answer_uncertainty(torch.stack([peaked.repeat(3, 1), torch.cat([peaked, flat, peaked])]))
    assert seq.confidence[1] == pytest.approx(float(seq.confidence[0]) * 0.25 / float(u.confidence[0]), rel=1e-4)
    with pytest.raises(ValueError):
        answer_uncertainty(torch.zeros(0, 4))


@pytest.mark.parametrize("unit,budget", [("samples", 20), ("bytes", 5000)])
def test_gate_respects_budget_every_period_and_prefers_uncertain(unit, budget):
    rng = np.random.default_rng(0)
    gate = BudgetGate(GateConfig(unit=unit, budget=budget, expected_arrivals=50))
    sent_scores, all_scores = [], []
    for period in range(8):
        gate.start_period()
        arrivals = 100 if period < 4 else 300  # the stream speeds up: the threshold must follow
        shift = 0.0 if period < 6 else 0.3  # then everything gets more uncertain
        for _ in range(arrivals):
            score = float(np.clip(rng.beta(2, 5) + shift, 0, 1))
            cost = float(rng.integers(200, 400))
            all_scores.append(score)
            if gate.decide(score, cost):
                sent_scores.append(score)
        assert gate.spent <= budget
        assert gate.accepted >= (10 if unit == "samples" else 8)  # the budget is used, not hoarded
    assert np.mean(sent_scores) > np.quantile(all_scores, 0.7)


def test_gate_floor_keeps_confident_samples_home():
    gate = BudgetGate(GateConfig(budget=1000, min_score=0.5))
    decisions = [gate.decide(s) for s in [0.1, 0.2, 0.6, 0.4, 0.9]]
    assert decisions == [False, False, True, False, True]
    with pytest.raises(ValueError):
        gate.decide(float("nan"))


def test_source_stats_match_torch_and_flag_shifted_tokens():
    g = torch.Generator().manual_seed(0)
    stats = SourceFeatureStats(8)
    chunks = [torch.randn(5, 7, 8, generator=g) * 2 + 1 for _ in range(4)]
    for c in chunks:
        stats.update(c)
    flat = torch.cat([c.reshape(-1, 8) for c in chunks]).double()
    assert torch.allclose(stats.mean, flat.mean(0)) and torch.allclose(stats.var, flat.var(0))
    normal = torch.randn(50, 8, generator=g) * 2 + 1
    shifted = normal + 6
    assert stats.ood_scores(shifted).mean() > 5 * stats.ood_scores(normal).mean()


def test_source_stats_save_load(tmp_path):
    stats = SourceFeatureStats(4)
    stats.update(torch.randn(30, 4))
    stats.save(tmp_path / "s.safetensors")
    back = SourceFeatureStats.load(tmp_path / "s.safetensors")
    assert back.count == 30 and torch.equal(back.mean, stats.mean)


def test_token_selection_follows_relevance_and_ood():
    relevance = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.3])
    ood = torch.tensor([5.0, 0.0, 4.0, 0.1, 3.0, 0.2])
    assert select_tokens(token_priority(relevance, None), 0.33).tolist() == [1, 3]
    assert select_tokens(token_priority(None, ood), 0.33).tolist() == [0, 2]
    mixed = select_tokens(token_priority(relevance, ood, 0.5), 0.5)
    assert len(mixed) == 3 and mixed.tolist() == sorted(mixed.tolist())
    assert len(select_tokens(torch.rand(144), 0.25, min_tokens=40)) == 40


def _sample(k: int = 5, n: int = 16, d: int = 8) -> UploadSample:
    g = torch.Generator().manual_seed(k)
    return UploadSample(
        features=torch.randn(k, d, generator=g) * 3,
        patch_indices=torch.sort(torch.randperm(n, generator=g)[:k]).values,
        num_patches=n,
        question="what color is the circle ?",
        answer_ids=torch.tensor([7, 3, 9]),
        answer_probs=torch.tensor([0.5, 0.3, 0.1]),
        uncertainty={"confidence": 0.5, "entropy": 0.4, "energy": -3.0},
    )


def test_upload_codec_round_trip_and_size():
    s = _sample(k=5, d=64)
    data = encode_sample(s)
    back = decode_sample(data)
    assert torch.equal(back.patch_indices, s.patch_indices) and back.question == s.question
    step = s.features.abs().amax(1, keepdim=True) / 127
    assert ((back.features - s.features).abs() <= step * 0.5 + 1e-3).all()
    assert back.uncertainty["confidence"] == pytest.approx(0.5)
    assert len(data) < s.features.numel() * 4  # smaller than the fp32 features alone
    assert len(data) - 5 * 64 < 700  # int8 codes + a small header


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: setattr(s, "patch_indices", torch.tensor([0, 1, 2, 3, 99])), "lie in"),
        (lambda s: setattr(s, "patch_indices", torch.tensor([3, 1, 2, 4, 5])), "ascending"),
        (lambda s: setattr(s, "features", torch.full((5, 8), math.nan)), "NaN"),
        (lambda s: setattr(s, "features", torch.zeros(0, 8)), "at least one"),
        (lambda s: setattr(s, "question", ""), "question"),
        (lambda s: setattr(s, "answer_probs", torch.tensor([0.9, 0.9, 0.9])), "sum to"),
    ],
)
def test_upload_codec_rejects_bad_samples(mutate, match):
    s = _sample()
    mutate(s)
    with pytest.raises(PayloadError, match=match):
        encode_sample(s)


def test_upload_decoder_rejects_foreign_bytes():
    with pytest.raises(PayloadError, match="format"):
        decode_sample(pack({"x": torch.zeros(2)}, {"format": "other"}))
    with pytest.raises(PayloadError):
        decode_sample(b"garbage-bytes-not-safetensors")
    data = bytearray(encode_sample(_sample()))
    with pytest.raises(PayloadError):
        decode_sample(bytes(data[: len(data) // 2]))


def test_a_non_square_token_grid_travels_with_format_1_only():
    from common.feature_basis import fit_basis
    from common.feature_codec import Rate
    from common.sample_codec import SampleCoding

    feats = torch.randn(3, 8)
    up = UploadSample(feats, torch.tensor([0, 5, 11]), 12, "q", torch.tensor([1]), torch.tensor([0.5]), grid=(3, 4))
    assert decode_sample(encode_sample(up)).grid == (3, 4)
    square = UploadSample(feats, torch.tensor([0, 5, 11]), 16, "q", torch.tensor([1]), torch.tensor([0.5]))
    assert decode_sample(encode_sample(square)).grid is None
    with pytest.raises(PayloadError, match="grid"):  # rows x columns must hold num_patches
        decode_sample(encode_sample(UploadSample(**{**up.__dict__, "grid": (2, 4)})))
    basis = fit_basis(torch.randn(64, 8), rank=4)
    with pytest.raises(PayloadError, match="format /1"):
        encode_sample(up, SampleCoding(basis, Rate(4, 4)))
