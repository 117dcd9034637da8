"""UTS on a micro LLaVA: the selected-token forward and the end-to-end device pipeline."""

from __future__ import annotations

import pytest
import torch

from common.llava_tokens import TokenPathError, answer_forward, vision_features
from common.sample_codec import UploadSample, decode_sample, encode_sample
from device.uts import (
    GateConfig,
    SourceFeatureStats,
    UncertaintyTokenSampler,
    UTSConfig,
    frame_bytes,
    jpeg_bytes,
)
from sim.experiment.micro import pixel_batch, random_pair
from sim.world import World
from sim.zoo.tokenizer import prompt_for


@pytest.fixture(scope="module")
def pair():
    return random_pair()


@pytest.fixture(scope="module")
def world():
    return World(0, 32)


def test_all_token_forward_matches_llava_forward(pair, world):
    samples = world.samples(0, 3, "fog")
    inputs = pair.processor(
        images=[s.image for s in samples],
        text=[prompt_for(s.question) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        ref = pair.device(**inputs).logits[:, -1]
        feats = vision_features(pair.device, inputs["pixel_values"])
        out = answer_forward(pair.device, pair.prompts, list(feats), [s.question for s in samples])
    # left padding in the reference shifts positions of the shorter prompts; compare the longest only
    longest = max(range(3), key=lambda i: int(inputs["attention_mask"][i].sum()))
    assert torch.allclose(ref[longest], out.logits[longest], atol=1e-4)
    single = answer_forward(pair.device, pair.prompts, [feats[0]], [samples[0].question])
    assert torch.allclose(single.logits[0], out.logits[0], atol=1e-4)  # right padding changes nothing


def test_token_path_rejects_bad_input(pair):
    with pytest.raises(TokenPathError, match="empty batch"):
        answer_forward(pair.device, pair.prompts, [], [])
    with pytest.raises(TokenPathError, match="features must be"):
        answer_forward(pair.device, pair.prompts, [torch.zeros(3, 5)], ["what color is the circle ?"])


@pytest.mark.parametrize("eager", [False, True])
def test_pipeline_respects_budget_and_encodes_selected_tokens(pair, world, eager):
    if eager:
        pair.device.set_attn_implementation("eager")
    samples = world.samples(100, 24, "night")
    feats = vision_features(pair.device, pixel_batch(pair.processor, [s.image for s in samples]))
    stats = SourceFeatureStats(feats.shape[-1])
    clear = world.samples(0, 16, "clear")
    stats.update(vision_features(pair.device, pixel_batch(pair.processor, [s.image for s in clear])))
    config = UTSConfig(keep_ratio=0.25, gate=GateConfig(budget=6, expected_arrivals=24))
    uts = UncertaintyTokenSampler(config, stats)
    results = uts.process(pair.device, pair.prompts, feats[:12], [s.question for s in samples[:12]])
    results += uts.process(pair.device, pair.prompts, feats[12:], [s.question for s in samples[12:]])
    sent = [r for r in results if r.sent]
    assert 1 <= len(sent) <= 6
    everything = UploadSample(
        feats[0], torch.arange(feats.shape[1]), feats.shape[1], "q ?", torch.tensor([1]), torch.tensor([1.0])
    )
    full = len(encode_sample(everything))
    for r in sent:
        up = decode_sample(r.payload)
        assert up.features.shape == (4, feats.shape[2]) and torch.equal(up.patch_indices, r.token_indices)
        i = results.index(r)
        assert torch.allclose(up.features, feats[i, r.token_indices], atol=feats.abs().max().item() / 100)
        assert len(r.payload) < 0.75 * full  # 4 of 16 tokens: well below sending all of them
        assert up.answer_ids[0] == r.answer_id
    assert frame_bytes(samples[0].image) == 32 * 32 * 3 and jpeg_bytes(samples[0].image) > 0
    pair.device.set_attn_implementation("sdpa")


def test_rater_scores_drive_selection(pair, world):
    samples = world.samples(7, 2, "clear")
    feats = vision_features(pair.device, pixel_batch(pair.processor, [s.image for s in samples]))
    rater = torch.zeros(feats.shape[1])
    rater[[1, 5, 9, 13]] = 1.0
    uts = UncertaintyTokenSampler(UTSConfig(relevance_weight=1.0, gate=GateConfig(budget=10)))
    results = uts.process(pair.device, pair.prompts, feats, [s.question for s in samples], [rater, rater])
    assert results[0].sent and results[0].token_indices.tolist() == [1, 5, 9, 13]
    with pytest.raises(ValueError, match="relevance scores"):
        uts.process(pair.device, pair.prompts, feats, [s.question for s in samples], [rater[:3], None])
