"""Shared setup of the cloud benchmarks: a zoo (reference if shipped, else the micro zoo), uploads, job specs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cloud.adaptation.config import AdaptationConfig, ModelFamily
from cloud.adaptation.worker import JobSpec
from common.llava_tokens import vision_features
from common.modeling import load_mllm
from common.sample_codec import UploadSample, encode_sample
from sim.experiment.micro import pixel_batch
from sim.world import World
from sim.zoo.build import ZooPaths, ensure_zoo
from sim.zoo.recipe import micro_recipe

REFERENCE = Path(__file__).resolve().parents[1] / "sim" / "zoo" / "reference" / "base"
FAMILY = "bench"


def add_zoo_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo", type=Path, default=None, help="Zoo directory with teacher/ and device/.")


def zoo_paths(zoo: Path | None) -> ZooPaths:
    """The given zoo, the shipped reference zoo, or the micro zoo (built in seconds and cached)."""
    if zoo is not None:
        return ZooPaths.at(zoo)
    if (REFERENCE / "device" / "config.json").is_file():
        return ZooPaths.at(REFERENCE)
    return ensure_zoo(micro_recipe(), progress=False)


def config(zoo: ZooPaths, **overrides) -> AdaptationConfig:
    base = dict(
        families={FAMILY: ModelFamily(device_model=str(zoo.device), teacher_model=str(zoo.teacher))},
        akd={"epochs": 2, "batch_size": 32},
        gate={"min_held_out": 4},
        device="cpu",
    )
    base.update(overrides)
    return AdaptationConfig.model_validate(base)


def uploads(zoo: ZooPaths, count: int, domain: str = "dusk", seed: int = 0) -> list[bytes]:
    """Encoded uploads (every second visual token of each image) from the device's vision tower."""
    loaded = load_mllm(zoo.device)
    world = World(seed, loaded.model.config.vision_config.image_size)
    samples = world.samples(0, count, domain)
    out = []
    for i in range(0, count, 64):
        chunk = samples[i : i + 64]
        with torch.no_grad():
            feats = vision_features(loaded.model, pixel_batch(loaded.processor, [s.image for s in chunk]))
        for s, f in zip(chunk, feats, strict=True):
            idx = torch.arange(0, f.shape[0], 2)
            sample = UploadSample(f[idx], idx, f.shape[0], s.question, torch.tensor([1]), torch.tensor([0.5]))
            out.append(encode_sample(sample))
    return out


def spec(job_id: int, device_id: str, payloads: list[bytes]) -> JobSpec:
    rows = [(device_id, i + 1, p, {}) for i, p in enumerate(payloads)]
    return JobSpec(job_id, f"device:{device_id}", "device", device_id, FAMILY, rows)
