"""The feature basis a zoo device model ships with: PCA of its vision tower's features on the clear domain.

Deterministic: the same weights, world seed and sample count give the same basis bytes (and version), so
``tandem-sim zoo basis`` rebuilds the shipped ``<member>/feature_basis/basis.safetensors`` and says whether it
is identical.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.feature_basis import FeatureBasis, fit_basis, load_basis
from common.llava_tokens import vision_features
from common.modeling import load_mllm
from sim.world import World

BASIS_OFFSET = 30_000_000
"""World indices the basis is fitted on (apart from the experiment's streams, held-out and calibration sets)."""
BASIS_SAMPLES = 512


@torch.no_grad()
def source_features(model_dir: Path, seed: int, samples: int = BASIS_SAMPLES, batch: int = 64) -> torch.Tensor:
    """Vision-tower features [samples, N, D] of clear-domain frames, as the device computes them."""
    loaded = load_mllm(model_dir)
    model, processor = loaded.model.eval(), loaded.processor
    world = World(seed, processor.image_processor.crop_size["height"])
    frames = world.samples(BASIS_OFFSET, samples, "clear")
    out = []
    for i in range(0, samples, batch):
        images = [s.image for s in frames[i : i + batch]]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out.append(vision_features(model, pixels))
    return torch.cat(out)


def build_basis(model_dir: Path, seed: int, samples: int = BASIS_SAMPLES) -> FeatureBasis:
    """Fit the full-rank basis of a device model directory (not written)."""
    torch.manual_seed(seed)
    return fit_basis(source_features(model_dir, seed, samples))


def write_basis(model_dir: Path, seed: int, samples: int = BASIS_SAMPLES) -> tuple[FeatureBasis, bool]:
    """Build the basis and write it into ``model_dir``; returns it and whether it equals the one already there."""
    basis = build_basis(model_dir, seed, samples)
    old = load_basis(model_dir)
    same = old is not None and old.version == basis.version
    basis.save(model_dir)
    return basis, same
