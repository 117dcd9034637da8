"""Helpers shared by the device-agent tests: micro zoo, agent configs, images, cloud-side DWC updates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.adapters import AdapterConfig
from common.llava_tokens import answer_forward
from device.agent.config import AgentConfig, load_agent_config
from sim.zoo.build import ZooPaths, ensure_zoo
from sim.zoo.recipe import micro_recipe

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a square?"]


def micro_zoo(home: Path) -> ZooPaths:
    """The micro zoo (built in about a second)."""
    return ensure_zoo(micro_recipe(), home=home, progress=False)


def agent_config(state_dir: Path, model_dir: Path, gateway: str = "127.0.0.1:1", **overrides) -> AgentConfig:
    """An agent on ephemeral ports with fast loops, a small SparseVLM budget and a small guard window."""
    base = {
        "transport.gateway": gateway,
        "transport.state_dir": str(state_dir),
        "transport.device_id": "dev-1",
        "transport.backoff_initial_s": 0.05,
        "transport.backoff_max_s": 0.5,
        "transport.backoff_jitter_s": 0.05,
        "transport.rpc_timeout_s": 20.0,
        "transport.poll_interval_s": 0.05,
        "transport.heartbeat_interval_s": 0.2,
        "model.source": str(model_dir),
        "sparse.budget": 8,
        "api.listen": "127.0.0.1:0",
        "api.max_wait_ms": 2.0,
        "metrics.port": None,
        "guard.window": 8,
        "uts.gate.budget": 1000,
        "log_json": False,
    }
    base.update(overrides)
    return load_agent_config(None, base)


def image_array(seed: int, size: int = 32) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def png_bytes(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(seed, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cloud_student(model_dir: Path):
    """What the cloud holds for this device: the device model with the shared v0 LoRA (cloud.akd)."""
    from cloud.akd import build_student
    from common.modeling import load_mllm

    loaded = load_mllm(model_dir)
    return build_student(loaded.model, AdapterConfig()), loaded.processor


def trained_target(student, prompts, features: torch.Tensor, questions: list[str], sharpen: bool, steps: int = 30):
    """Adapter weights trained to make answers more (``sharpen``) or less confident: a good or damaging update."""
    from cloud.akd import adapter_state

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        logits = answer_forward(student, prompts, list(features), questions).logits
        logp = torch.log_softmax(logits.float(), -1)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        loss = entropy if sharpen else -entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter_state(student)
