"""Checks on an Ask request before any decoding work (shared by the gRPC API and the agent's Python API)."""

from __future__ import annotations

from google.protobuf import unknown_fields

from common.errors import TandemError
from device.agent.config import ApiSettings
from protocol.tandem.v1 import agent_pb2


class RequestError(TandemError):
    """A request is malformed (answered with INVALID_ARGUMENT)."""


def check_ask(request: agent_pb2.AskRequest, api: ApiSettings) -> None:
    """Raise RequestError naming the first problem of an Ask request."""
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
    if request.max_new_tokens > api.max_new_tokens_limit:
        raise RequestError(f"max_new_tokens {request.max_new_tokens} exceeds {api.max_new_tokens_limit}")
