"""Streams and held-out sets of the synthetic world as precomputed vision-tower features.

The vision tower is frozen and shared, so features are computed once per sample and reused by every arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.llava_tokens import vision_features
from sim.experiment.micro import ModelPair, pixel_batch
from sim.world import World

EVAL_OFFSET = 10_000_000
CALIBRATION_OFFSET = 20_000_000


@dataclass
class FeatureSet:
    """Features [B, N, D], questions, answer token ids [B] and the raw frames (for byte comparisons)."""

    features: torch.Tensor
    questions: list[str]
    answer_ids: torch.Tensor
    images: list


@torch.no_grad()
def feature_set(pair: ModelPair, world: World, start: int, count: int, domain: str, batch: int = 64) -> FeatureSet:
    """``count`` samples from index ``start`` of ``domain`` with their tower features."""
    tok = pair.processor.tokenizer
    samples = world.samples(start, count, domain)
    feats = []
    for i in range(0, count, batch):
        chunk = samples[i : i + batch]
        feats.append(vision_features(pair.device, pixel_batch(pair.processor, [s.image for s in chunk])))
    answers = torch.tensor([tok.convert_tokens_to_ids(s.answer) for s in samples])
    return FeatureSet(torch.cat(feats), [s.question for s in samples], answers, [s.image for s in samples])
