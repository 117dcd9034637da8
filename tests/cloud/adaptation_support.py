"""Helpers of the adaptation tests: micro-zoo uploads, an adaptation config on the micro zoo, service wiring."""

from __future__ import annotations

from pathlib import Path

import torch

from cloud.adaptation.config import AdaptationConfig, ModelFamily
from cloud.samples.base import Sample
from common.llava_tokens import vision_features
from common.modeling import load_mllm
from common.sample_codec import UploadSample, encode_sample
from sim.experiment.micro import pixel_batch
from sim.world import World

FAMILY = "micro"


def adaptation_config(zoo, **overrides) -> AdaptationConfig:
    """Fast settings on the micro zoo: small triggers, few epochs, no held-out minimum surprises."""
    base = dict(
        families={FAMILY: ModelFamily(device_model=str(zoo.device), teacher_model=str(zoo.teacher))},
        akd={"epochs": 2, "batch_size": 16, "lr": 5e-3, "adapter": {"rank": 4}},
        dwc={"bits": 8},
        trigger={"min_samples": 20, "max_interval_s": 3600},
        gate={"held_out_every": 5, "min_held_out": 2, "margin": 0.05},
        poll_interval_s=0.1,
        executor="inprocess",
        device="cpu",
        label_batch_size=32,
    )
    base.update(overrides)
    return AdaptationConfig.model_validate(base)


def make_uploads(zoo, count: int, domain: str = "dusk", start: int = 0, seed: int = 0) -> list[bytes]:
    """``count`` encoded uploads: half of each image's visual tokens from the device's vision tower."""
    model = load_mllm(zoo.device).model
    processor = load_mllm(zoo.device).processor
    world = World(seed, model.config.vision_config.image_size)
    samples = world.samples(start, count, domain)
    with torch.no_grad():
        feats = vision_features(model, pixel_batch(processor, [s.image for s in samples]))
    out = []
    for s, f in zip(samples, feats, strict=True):
        idx = torch.arange(0, f.shape[0], 2)
        up = UploadSample(f[idx], idx, f.shape[0], s.question, torch.tensor([1]), torch.tensor([0.5]))
        out.append(encode_sample(up))
    return out


def store_samples(store, device_id: str, payloads: list[bytes], first_seq: int = 1, meta: dict | None = None) -> None:
    """Put payloads into a sample store as the gateway would (seq from ``first_seq``)."""
    store.put([Sample(device_id, first_seq + i, p, dict(meta or {})) for i, p in enumerate(payloads)])


def data_dirs(root: Path) -> tuple[Path, Path]:
    """``(data_dir, state_dir)`` under ``root``."""
    return root / "data", root / "data" / "adaptation"


def newest_job(jobs_db: Path):
    """The newest job in a trainer's ``jobs.db`` (read from another process), or None."""
    from cloud.adaptation.job_store import SqliteJobStore

    store = SqliteJobStore(jobs_db, "NORMAL")
    try:
        found = store.list(limit=1)
        return found[0] if found else None
    finally:
        store.close()
