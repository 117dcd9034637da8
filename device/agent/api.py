"""The local gRPC API (``tandem.v1.DeviceAgent``): Ask and Status, on a unix socket or 127.0.0.1.

Every request is checked before it is queued: an image that is not a JPEG/PNG, truncated, too many bytes or
pixels, an empty or overlong question, too many answer tokens, or fields this agent does not know get
INVALID_ARGUMENT with a message; the agent keeps serving. The API depends only on ``AnswerBackend`` (what it
needs of an agent); the composer (``device.agent.service``) hands it the ``DeviceAgent``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import grpc

from common.errors import TandemError
from device.agent.batcher import BatcherBusy, BatcherStopped
from device.agent.config import AgentConfig
from device.agent.requests import RequestError, check_ask
from device.agent.sources import decode_image
from device.agent.step import Answer, Frame
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["AnswerBackend", "DeviceAgentServicer", "RequestError", "check_ask", "start_api", "to_response"]

log = logging.getLogger("tandem.device.api")
_SLACK = 64 * 1024  # room for the question and framing above the image limit
INLINE_DECODE_BYTES = 64 * 1024


class AnswerBackend(Protocol):
    """What the local API needs of an agent: its settings, its request counter, answers and status."""

    config: AgentConfig
    metrics: Any  # device.agent.metrics.AgentMetrics (``requests`` counter)

    async def answer(self, frame: Frame, source: str = "api") -> Answer: ...

    def status(self) -> dict: ...


def to_response(answer: Answer) -> agent_pb2.AskResponse:
    return agent_pb2.AskResponse(
        answer=answer.answer,
        confidence=answer.confidence,
        adapter_version=answer.version,
        visual_tokens_kept=answer.kept_tokens,
        visual_tokens_total=answer.total_tokens,
        latency_ms=answer.latency_s * 1e3,
        uplinked=answer.sent,
        uncertainty=answer.score,
        tokens=answer.tokens,
        token_confidences=answer.token_confidences,
        mean_token_entropy=answer.uncertainty.get("entropy", 0.0),
        min_token_margin=answer.uncertainty.get("margin", 0.0),
    )


class DeviceAgentServicer(agent_pb2_grpc.DeviceAgentServicer):
    """gRPC front of an ``AnswerBackend``."""

    def __init__(self, agent: AnswerBackend) -> None:
        self.agent = agent

    async def Ask(self, request: agent_pb2.AskRequest, context) -> agent_pb2.AskResponse:  # noqa: N802
        api = self.agent.config.api
        try:
            check_ask(request, api)
            if len(request.image) <= INLINE_DECODE_BYTES:  # small images: decoding costs less than a thread hop
                pixels = decode_image(request.image, api.max_image_pixels)
            else:
                pixels = await asyncio.to_thread(decode_image, request.image, api.max_image_pixels)
        except TandemError as exc:
            self.agent.metrics.requests.labels("api", "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        frame = Frame(request.question.strip(), image=pixels, max_new_tokens=request.max_new_tokens or None)
        try:
            answer = await self.agent.answer(frame, source="api")
        except BatcherBusy as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except BatcherStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "answer took longer than api.request_timeout_s")
        return to_response(answer)

    async def Status(self, request: agent_pb2.AgentStatusRequest, context) -> agent_pb2.AgentStatusResponse:  # noqa: N802
        return agent_pb2.AgentStatusResponse(**self.agent.status())


async def start_api(agent: AnswerBackend, listen: str) -> tuple[grpc.aio.Server, str]:
    """Start the API server on ``listen`` (``host:port``, port 0 picks one, or ``unix://path``)."""
    limit = agent.config.api.max_image_bytes + _SLACK
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 1 << 20)]
    )
    agent_pb2_grpc.add_DeviceAgentServicer_to_server(DeviceAgentServicer(agent), server)
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise TandemError(f"cannot listen on {listen} (address in use?)")
    await server.start()
    address = listen if listen.startswith("unix:") else f"{listen.rsplit(':', 1)[0]}:{port}"
    log.info("device API serving on %s", address)
    return server, address
