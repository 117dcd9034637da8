"""The agent end to end against an in-process gateway on 127.0.0.1 (micro zoo): answers, uplink, DWC updates
applied and swapped live, bit-exact answers and digests, bad updates, and the regression guard."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from agent_support import QUESTIONS, agent_config, cloud_student, image_array, micro_zoo, png_bytes, trained_target
from peft import PeftModel
from transport_support import running_gateway

from cloud.dwc import CloudMirror, DWCConfig, compress
from cloud.gateway.servicer import DeviceGatewayServicer
from cloud.updates import SqliteUpdateRegistry
from common.delta_codec import state_digest
from common.modeling import load_mllm
from common.signing import generate_private_key
from device.agent import DeviceAgent, DeviceModel
from device.agent.service import AgentService
from device.agent.step import Frame
from device.transport.client import GatewayClient
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


async def _register(cfg) -> None:
    client = GatewayClient(cfg.transport)
    (await client.register()).save(cfg.state_dir)
    await client.close()


async def _until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _stream_features(agent: DeviceAgent, n: int = 8):
    feats = agent.model.features([image_array(100 + i) for i in range(n)])
    return feats, [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]


async def test_ask_uplinks_applies_dwc_update_bit_exact(zoo, tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = agent_config(tmp_path / "dev", zoo.device, gw.address)
        await _register(cfg)
        agent = DeviceAgent(cfg)
        service = AgentService(agent)
        await service.start()
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = agent_pb2_grpc.DeviceAgentStub(channel)
                first = await stub.Ask(agent_pb2.AskRequest(image=png_bytes(1), question=QUESTIONS[0]))
                assert first.adapter_version == "v0" and first.answer
                assert first.visual_tokens_total == 16 and first.visual_tokens_kept == 8  # SparseVLM budget 8
                await _until(lambda: gw.samples.count("dev-1") >= 1, what="the uncertain sample in the store")

                # the cloud: mirror of v0 (same shared LoRA init), a changed target, DWC against the mirror
                student, _ = cloud_student(zoo.device)
                from cloud.akd import adapter_state

                mirror = CloudMirror(adapter_state(student))
                assert state_digest(mirror.state) == agent.step.model.adapter.digest()
                target = {k: v + 0.05 * torch.randn_like(v) for k, v in mirror.state.items()}
                update = compress(mirror, target, DWCConfig(bits=8))
                mirror.commit(update)
                gw.publish("dev-1", "v0", "v1", update.payload, dict(update.header.metadata))
                await _until(lambda: agent.step.version == "v1", what="the swap to v1")

                after = await stub.Ask(agent_pb2.AskRequest(image=png_bytes(2), question=QUESTIONS[1]))
                assert after.adapter_version == "v1"
                assert agent.step.model.adapter.digest() == state_digest(mirror.state)
                status = await stub.Status(agent_pb2.AgentStatusRequest())
                assert status.adapter_version == "v1" and status.previous_version == "v0" and status.swaps == 1
        finally:
            await service.stop()

    # a reference model built independently from the PEFT export of the agent's store answers identically
    export = agent.store.export_peft(tmp_path / "export")
    ref_model = PeftModel.from_pretrained(load_mllm(zoo.device).model, str(export))
    reference = DeviceModel(ref_model, agent.model.processor, sparse=cfg.sparse)
    from device.agent.sources import decode_image

    pixels = decode_image(png_bytes(2), 1 << 20)
    feats = reference.features([pixels])
    ref_out = reference.forward(feats, [QUESTIONS[1]])
    agent_out = agent.model.forward(agent.model.features([pixels]), [QUESTIONS[1]])
    assert torch.equal(ref_out.logits, agent_out.logits)
    confidence = torch.softmax(ref_out.logits, -1).max().item()
    assert confidence == pytest.approx(after.confidence, rel=0, abs=1e-7)
    assert reference.decode(int(ref_out.logits.argmax())) == after.answer


async def test_bad_updates_are_rejected_and_old_version_keeps_serving(zoo, tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = agent_config(tmp_path / "dev", zoo.device, gw.address)
        await _register(cfg)
        agent = DeviceAgent(cfg)
        service = AgentService(agent)
        await service.start()
        try:
            v0_digest = agent.step.model.adapter.digest()
            student, _ = cloud_student(zoo.device)
            from cloud.akd import adapter_state

            mirror = CloudMirror(adapter_state(student))
            good = compress(mirror, {k: v + 0.05 * torch.randn_like(v) for k, v in mirror.state.items()}, DWCConfig())
            # NaN: a payload whose scales are NaN (digest and signature fine: the cloud signed what it published)
            from common.tensor_pack import pack, unpack

            tensors, meta = unpack(good.payload)
            tensors["scales"] = torch.full_like(tensors["scales"], float("nan"))
            nan_payload = pack(tensors, meta)
            # wrong DWC base: built on a mirror at another version
            other = CloudMirror(mirror.state, version="v5")
            wrong_base = compress(other, {k: v + 0.01 for k, v in mirror.state.items()}, DWCConfig())
            answers: list = []
            failures: list = []

            async def keep_asking():
                i = 0
                while True:
                    try:
                        answers.append(await agent.ask(png_bytes(i), QUESTIONS[i % 3]))
                    except Exception as exc:  # noqa: BLE001 - any failure is a test failure
                        failures.append(exc)
                    i += 1
                    await asyncio.sleep(0.005)

            asker = asyncio.create_task(keep_asking())
            tampered = gw.publish("dev-1", "v0", "v1", good.payload, dict(good.header.metadata))
            blob = gw.updates.blob_path(tampered)
            raw = bytearray(blob.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            blob.write_bytes(bytes(raw))
            foreign = SqliteUpdateRegistry(gw.updates.data_dir, generate_private_key())
            forged = compress(mirror, {k: v - 0.05 for k, v in mirror.state.items()}, DWCConfig())
            foreign.publish("dev-1", "v0", "v1", forged.payload, dict(forged.header.metadata))  # signed by another key
            foreign.close()
            gw.servicer.notify_published()
            gw.publish("dev-1", "v0", "v1", nan_payload, dict(good.header.metadata))
            gw.publish("dev-1", "v0", "v1", wrong_base.payload, dict(wrong_base.header.metadata))
            await _until(lambda: agent.link.fetcher.stats.rejected >= 4 and len(answers) >= 10, what="four rejections")
            asker.cancel()
            reasons = [o.reason for o in agent.link.fetcher.outcomes]
        finally:
            await service.stop()
    assert not failures and len(answers) >= 10
    assert {a.version for a in answers} == {"v0"} and agent.step.model.adapter.digest() == v0_digest
    joined = " | ".join(reasons)
    for needle in ("digest", "signature", "NaN", "base version"):
        assert needle in joined, (needle, joined)
    assert agent.store.current().version == "v0"


async def test_guard_keeps_a_good_update_and_rolls_back_a_damaging_one(zoo, tmp_path, monkeypatch):
    heartbeats: list = []
    original = DeviceGatewayServicer.Heartbeat

    async def recording(self, request, context):
        heartbeats.append(request)
        return await original(self, request, context)

    monkeypatch.setattr(DeviceGatewayServicer, "Heartbeat", recording)
    async with running_gateway(tmp_path / "cloud") as gw:
        # the micro zoo's answers are near uniform over 50 words (confidence about 0.04), hence the small margin
        cfg = agent_config(tmp_path / "dev", zoo.device, gw.address, **{"guard.window": 8, "guard.margin": 0.01})
        await _register(cfg)
        agent = DeviceAgent(cfg)
        service = AgentService(agent)
        await service.start()
        try:
            feats, questions = _stream_features(agent)
            frames = [Frame(q, features=f) for f, q in zip(feats, questions, strict=True)]
            stop = asyncio.Event()

            async def stream():
                while not stop.is_set():
                    await asyncio.gather(*(agent.answer(f, "world") for f in frames))

            streamer = asyncio.create_task(stream())
            student, _ = cloud_student(zoo.device)
            from cloud.akd import adapter_state

            mirror = CloudMirror(adapter_state(student))
            sharp = trained_target(student, agent.model.prompts, feats, questions, sharpen=True)
            up1 = compress(mirror, sharp, DWCConfig(bits=8, energy_share=1.0))
            mirror.commit(up1)
            await _until(lambda: agent.guard is not None and len(agent.guard._recent) >= 8, what="a baseline")
            gw.publish("dev-1", "v0", "v1", up1.payload, dict(up1.header.metadata))
            await _until(lambda: agent.step.version == "v1", what="v1")
            await _until(lambda: agent.guard.armed_version is None, what="the verdict on v1")
            assert agent.counts["rollbacks"] == 0 and agent.step.version == "v1"

            flat = trained_target(student, agent.model.prompts, feats, questions, sharpen=False, steps=60)
            up2 = compress(mirror, flat, DWCConfig(bits=8, energy_share=1.0))
            gw.publish("dev-1", "v1", "v2", up2.payload, dict(up2.header.metadata))
            await _until(lambda: agent.counts["rollbacks"] == 1, what="the rollback of v2")
            assert agent.step.version == "v1" and agent.step.model.adapter.digest() == state_digest(mirror.state)
            await _until(lambda: any(h.rolled_back_from == "v2" for h in heartbeats), what="the rollback heartbeat")
            await _until(lambda: agent.store.pending_rollback() is None, what="the rollback acknowledged")
            stop.set()
            await streamer
        finally:
            await service.stop()
        events = [e for e in gw.devices.rollbacks() if e.device_id == "dev-1"]
    assert [(e.from_version, e.to_version) for e in events][:1] == [("v2", "v1")]  # the cloud recorded it
    told = next(h for h in heartbeats if h.rolled_back_from == "v2")
    assert told.applied_version == "v1" and "confidence fell" in told.rollback_reason
    assert agent.store.current().version == "v1"
