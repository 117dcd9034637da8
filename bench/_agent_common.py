"""Helpers of the agent benchmarks: a device model at zoo geometry, an offline agent, gRPC clients, figures."""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from device.agent import DeviceAgent, load_agent_config
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = REPO_ROOT / "sim" / "zoo" / "reference"
QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a square?", "where is the star?"]


def model_dir(recipe: str = "base") -> tuple[Path, str]:
    """The reference zoo's device model when shipped; else a randomly initialised device model of the recipe's
    geometry (same shapes, so the same time per forward), saved once under the zoo cache. Returns (dir, label)."""
    shipped = REFERENCE / recipe / "device"
    if (shipped / "config.json").is_file():
        return shipped, f"reference zoo {recipe}/device"
    from sim.zoo.architecture import build_llava
    from sim.zoo.build import zoo_home
    from sim.zoo.recipe import RECIPES
    from sim.zoo.tokenizer import IMAGE_TOKEN, build_processor

    spec = RECIPES[recipe]()
    target = zoo_home().parent / "bench-models" / f"{recipe}-{spec.digest()}-random"
    if not (target / "config.json").is_file():
        processor = build_processor(spec.vision.image_size, spec.vision.patch_size)
        tok = processor.tokenizer
        model = build_llava(
            spec.vision, spec.device, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id, 0
        )
        staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    return target, f"{recipe} geometry, random weights (reference zoo not shipped yet)"


def png(seed: int, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_size(directory: Path) -> int:
    import json

    return int(json.loads((directory / "config.json").read_text())["vision_config"]["image_size"])


def offline_agent(directory: Path, state: Path, **overrides) -> DeviceAgent:
    """An agent without a cloud (samples stay in its outbox), API on 127.0.0.1, metrics off."""
    base = {
        "transport.state_dir": str(state),
        "transport.device_id": "bench",
        "model.source": str(directory),
        "api.listen": "127.0.0.1:0",
        "metrics.port": None,
        "log_json": False,
    }
    base.update(overrides)
    return DeviceAgent(load_agent_config(None, base), connect=False)


async def ask(stub, image: bytes, question: str) -> tuple[float, agent_pb2.AskResponse]:
    t0 = time.perf_counter()
    reply = await stub.Ask(agent_pb2.AskRequest(image=image, question=question))
    return time.perf_counter() - t0, reply


def stub_for(channel):
    return agent_pb2_grpc.DeviceAgentStub(channel)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def run(coro):
    return asyncio.run(coro)
