"""The whole loop at LLaVA-1.5-7B geometry (opt-in: TANDEM_SLOW=1; about 10 minutes and 8 GB here).

The ``llava-1.5-7b-shape`` zoo member (hidden 4096, vocabulary 32064, 576 visual tokens; 13B-shaped teacher) on
the real parts: an agent in 4-bit NF4 with SparseVLM (Tandem preset, then paper-parity) answers two-token
questions over gRPC, UTS uplinks through a real gateway; the cloud labels the stored upload with the teacher's
answer sequence, distils it into LoRA at width 4096, gates, compresses with DWC and publishes a signed update; the
agent verifies, applies and swaps, and answers with the new version holding exactly the cloud's mirror.
"""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest
from agent_support import agent_config
from transport_support import running_gateway

from cloud.adaptation.gate import validate
from cloud.akd import AKDConfig, AKDTrainer, teacher_labels
from cloud.dwc import CloudMirror, DWCConfig, compress
from common.delta_codec import state_digest
from common.llava_tokens import PromptBuilder
from common.modeling import load_mllm
from common.sample_codec import decode_sample
from device.agent import DeviceAgent
from device.agent.service import AgentService
from device.sparse import SparseConfig
from device.transport.client import GatewayClient
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
QUESTION = "what color is the circle ?"


def _frame_png(seed: int) -> bytes:
    import io

    from PIL import Image

    from sim.world import World

    buf = io.BytesIO()
    Image.fromarray(World(seed, 336).sample(0, "night").image).save(buf, "PNG")
    return buf.getvalue()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _cloud_update(root, payload: bytes, device_v0_digest: str):
    """Teacher sequence labels, AKD at width 4096, the gate and DWC: what the trainer does for one upload."""
    sample = decode_sample(payload)
    teacher = load_mllm(root / "teacher", dtype="float32")
    prompts_t = PromptBuilder(teacher.processor.tokenizer, teacher.model.config.image_token_id)
    labels = teacher_labels(teacher.model, prompts_t, [sample], max_new_tokens=2)
    hidden = teacher.model.config.text_config.hidden_size
    del teacher
    gc.collect()
    device = load_mllm(root / "device", dtype="float32")
    prompts = PromptBuilder(device.processor.tokenizer, device.model.config.image_token_id)
    trainer = AKDTrainer(device.model, hidden, prompts, AKDConfig(epochs=1, batch_size=1, lr=1e-3))
    del device
    gc.collect()
    start = trainer.adapter_state()
    assert state_digest(start) == device_v0_digest  # the cloud's v0 LoRA is the device's, bit for bit
    report = trainer.train([sample], labels)
    gate = validate(trainer, start, trainer.adapter_state(), [sample], labels, margin=1.0, min_held_out=1)
    mirror = CloudMirror(start)
    update = compress(mirror, trainer.adapter_state(), DWCConfig(bits="auto", selection="impact"))
    mirror.commit(update)
    return labels, report, gate, update, mirror


async def test_whole_loop_at_llava_7b_geometry(tmp_path):
    from sim.zoo.shapes import SHAPES, ensure_shape

    root = ensure_shape(SHAPES["llava-1.5-7b-shape"]())
    async with running_gateway(tmp_path / "cloud", max_sample_bytes=8 * 1024 * 1024) as gw:
        cfg = agent_config(
            tmp_path / "dev", root / "device", gw.address,
            **{"model.quantization": "4bit", "model.max_new_tokens": 2, "sparse.budget": 64,
               "sparse.budget_kind": "layer_average", "sparse.budget_reference": 576, "api.request_timeout_s": 600.0,
               "uts.keep_ratio": 0.25, "guard.enabled": False},
        )  # fmt: skip
        client = GatewayClient(cfg.transport)
        (await client.register()).save(cfg.state_dir)
        await client.close()
        agent = DeviceAgent(cfg)
        assert (
            type(agent.model.model.base_model.model.model.language_model.layers[0].mlp.up_proj.base_layer).__name__
            == "Linear4bit"
        )
        service = AgentService(agent)
        await service.start()
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = agent_pb2_grpc.DeviceAgentStub(channel)
                first = await stub.Ask(agent_pb2.AskRequest(image=_frame_png(1), question=QUESTION), timeout=600)
                assert first.adapter_version == "v0" and 1 <= len(first.tokens) <= 2
                assert first.visual_tokens_total == 576 and first.visual_tokens_kept < 64
                paper = SparseConfig.paper_parity(64)
                agent.batcher.between_batches(lambda: agent.model.set_sparse(paper)).result(60)
                second = await stub.Ask(agent_pb2.AskRequest(image=_frame_png(2), question=QUESTION), timeout=600)
                assert second.visual_tokens_total == 576 and second.visual_tokens_kept < 576
                await _until(lambda: gw.samples.count("dev-1") >= 1, 120, "an upload in the gateway's store")
                stored = next(gw.samples.iter_samples("dev-1"))
                assert decode_sample(stored.payload).features.shape == (144, 1024)  # keep 0.25 of 576, width 1024

                v0 = agent.step.model.adapter.digest()
                labels, report, gate, update, mirror = await asyncio.to_thread(_cloud_update, root, stored.payload, v0)
                assert labels.is_sequence or len(labels.sequences[0]) == 1
                assert report.steps == 1 and gate.passed
                assert update.header.base_version == "v0" and len(update.payload) < 5_427_736  # < the fp32 LoRA
                gw.publish("dev-1", "v0", "v1", update.payload, dict(update.header.metadata))
                await _until(lambda: agent.step.version == "v1", 300, "the swap to v1")
                after = await stub.Ask(agent_pb2.AskRequest(image=_frame_png(3), question=QUESTION), timeout=600)
                assert after.adapter_version == "v1"
                assert agent.step.model.adapter.digest() == state_digest(mirror.state)
        finally:
            await service.stop()
