"""The local API of an offline agent (micro zoo): Ask, bad requests, micro-batching, Status, metrics, the CLI."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from agent_support import QUESTIONS, agent_config, jpeg_bytes, micro_zoo, png_bytes

from common.errors import TandemError
from device.agent import DeviceAgent
from device.agent.service import AgentService
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


def _unknown_field_request() -> bytes:
    good = agent_pb2.AskRequest(image=png_bytes(0), question=QUESTIONS[0]).SerializeToString()
    return good + bytes([0x48, 0x01])  # field 9, varint 1: not in AskRequest


async def test_bad_requests_are_invalid_argument_and_the_agent_keeps_serving(zoo, tmp_path):
    cfg = agent_config(tmp_path / "dev", zoo.device, **{"api.max_image_bytes": 50_000, "api.max_question_chars": 64})
    agent = DeviceAgent(cfg, connect=False)
    service = AgentService(agent)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = agent_pb2_grpc.DeviceAgentStub(channel)
            truncated = jpeg_bytes(3)[:-200]
            cases = {
                "not a JPEG or PNG": agent_pb2.AskRequest(image=b"hello, not an image" * 10, question="q?"),
                "truncated": agent_pb2.AskRequest(image=truncated, question="what colour?"),
                "question is empty": agent_pb2.AskRequest(image=png_bytes(1), question="   "),
                "exceeds 64": agent_pb2.AskRequest(image=png_bytes(1), question="x" * 65),
                "bytes exceeds 50000": agent_pb2.AskRequest(image=b"\x89PNG" + b"\0" * 60_000, question="q?"),
                "image is empty": agent_pb2.AskRequest(question="q?"),
            }
            for needle, request in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Ask(request)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
                assert needle in info.value.details(), (needle, info.value.details())
            raw = channel.unary_unary("/tandem.v1.DeviceAgent/Ask", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(_unknown_field_request())
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown fields" in info.value.details()
            ok = await stub.Ask(agent_pb2.AskRequest(image=jpeg_bytes(4), question=QUESTIONS[2]))
            assert ok.answer and ok.adapter_version == "v0" and ok.latency_ms > 0
        with pytest.raises(TandemError, match="question is empty"):
            await agent.ask(png_bytes(1), "")
    finally:
        await service.stop()


async def test_concurrent_requests_share_batches_and_metrics_count_them(zoo, tmp_path):
    cfg = agent_config(tmp_path / "dev", zoo.device, **{"api.max_batch": 8, "api.max_wait_ms": 50.0, "metrics.port": 0})
    agent = DeviceAgent(cfg, connect=False)
    service = AgentService(agent)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = agent_pb2_grpc.DeviceAgentStub(channel)
            replies = await asyncio.gather(
                *(stub.Ask(agent_pb2.AskRequest(image=png_bytes(i), question=QUESTIONS[i % 3])) for i in range(16))
            )
            status = await stub.Status(agent_pb2.AgentStatusRequest())
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics").read().decode()
        )
    finally:
        await service.stop()
    assert len(replies) == 16 and all(r.adapter_version == "v0" for r in replies)
    assert agent.batcher.batches < 16  # requests shared forwards
    assert status.requests == 16 and status.samples_selected == sum(r.uplinked for r in replies)
    assert 'tandem_agent_requests_total{outcome="ok",source="api"} 16.0' in body
    assert 'tandem_agent_adapter_info{version="v0"} 1.0' in body
    assert "tandem_agent_visual_tokens_kept_bucket" in body


async def test_restart_serves_the_held_version_and_python_api(zoo, tmp_path):
    cfg = agent_config(tmp_path / "dev", zoo.device)
    first = DeviceAgent(cfg, connect=False)
    digest = first.step.model.adapter.digest()
    await first.start()
    answer = await first.ask(png_bytes(7), QUESTIONS[0])
    await first.stop()
    again = DeviceAgent(cfg, connect=False)
    await again.start()
    try:
        repeat = await again.ask(png_bytes(7), QUESTIONS[0])
    finally:
        await again.stop()
    assert again.step.model.adapter.digest() == digest and again.step.version == "v0"
    assert (repeat.answer, repeat.confidence) == (answer.answer, answer.confidence)
    assert again.outbox is not None
