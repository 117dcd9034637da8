"""Shared helpers of the SparseVLM tests: a tiny random LLaVA and one sparse prefill over world samples."""

from __future__ import annotations

from typing import Any

import torch

from device.sparse import SparseConfig, enable_sparsevlm, sparse_stats
from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.recipe import TextSpec, VisionSpec
from sim.zoo.tokenizer import build_processor, prompt_for


def tiny_llava(vision: VisionSpec, text: TextSpec, seed: int = 4) -> tuple[Any, Any]:
    """A random-init LLaVA of this geometry (eval mode) and its processor."""
    processor = build_processor(vision.image_size, vision.patch_size)
    tok = processor.tokenizer
    model = build_llava(vision, text, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, seed=seed)
    return model.eval(), processor


def run_sparse(model: Any, processor: Any, cfg: SparseConfig, indices=(0, 1), **kw: Any) -> tuple[Any, Any, list]:
    """One forward over world samples ``indices`` with SparseVLM ``cfg``: (inputs, output, per-sample stats)."""
    world = World(0, processor.image_processor.crop_size["height"])
    samples = [world.sample(i) for i in indices]
    enc = processor(
        images=[s.image for s in samples], text=[prompt_for(s.question) for s in samples], return_tensors="pt",
        padding=True,
    )  # fmt: skip
    enable_sparsevlm(model, cfg)
    with torch.no_grad():
        out = model(**enc, **kw)
    return enc, out, sparse_stats(model).samples
