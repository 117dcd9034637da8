"""The local gRPC API (``tandem.v1.DeviceAgent``): Ask and Status, on a unix socket or 127.0.0.1.

Every request is checked before it is queued: an image that is not a JPEG/PNG, truncated, too many bytes or
pixels, an empty or overlong question, or fields this agent does not know get INVALID_ARGUMENT with a message;
the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from google.protobuf import unknown_fields

from common.errors import TandemError
from device.agent.batcher import BatcherBusy, BatcherStopped
from device.agent.config import ApiSettings
from device.agent.sources import decode_image
from device.agent.step import Answer, Frame
from protocol.tandem.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from device.agent.agent import DeviceAgent

log = logging.getLogger("tandem.device.api")
_SLACK = 64 * 1024  # room for the question and framing above the image limit


class RequestError(TandemError):
    """A request is malformed (answered with INVALID_ARGUMENT)."""


def check_ask(request: agent_pb2.AskRequest, api: ApiSettings) -> None:
    """Raise RequestError naming the first problem of an Ask request (before any decoding work)."""
    unknown = unknown_fields.UnknownFieldSet(request)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise RequestError(f"unknown fields in AskRequest: {numbers}")
    question = request.question.strip()
    if not question:
        raise RequestError("question is empty")
    if len(request.question) > api.max_question_chars:
        raise RequestError(f"question of {len(request.question)} chars exceeds {api.max_question_chars}")
    if not request.image:
        raise RequestError("image is empty")
    if len(request.image) > api.max_image_bytes:
        raise RequestError(f"image of {len(request.image)} bytes exceeds {api.max_image_bytes}")


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
    )


class DeviceAgentServicer(agent_pb2_grpc.DeviceAgentServicer):
    """gRPC front of a DeviceAgent."""

    def __init__(self, agent: DeviceAgent) -> None:
        self.agent = agent

    async def Ask(self, request: agent_pb2.AskRequest, context) -> agent_pb2.AskResponse:  # noqa: N802
        api = self.agent.config.api
        try:
            check_ask(request, api)
            pixels = await asyncio.to_thread(decode_image, request.image, api.max_image_pixels)
        except TandemError as exc:
            self.agent.metrics.requests.labels("api", "invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            answer = await self.agent.answer(Frame(request.question.strip(), image=pixels), source="api")
        except BatcherBusy as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except BatcherStopped as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "answer took longer than api.request_timeout_s")
        return to_response(answer)

    async def Status(self, request: agent_pb2.AgentStatusRequest, context) -> agent_pb2.AgentStatusResponse:  # noqa: N802
        return agent_pb2.AgentStatusResponse(**self.agent.status())


async def start_api(agent: DeviceAgent, listen: str) -> tuple[grpc.aio.Server, str]:
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
