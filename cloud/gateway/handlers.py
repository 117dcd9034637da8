"""Registers the servicer with deserializers that never raise: a corrupt frame becomes ``MalformedMessage``.

grpc answers UNKNOWN (and logs a traceback) when a request deserializer raises; Tandem answers
INVALID_ARGUMENT instead, from the handler that receives the marker.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from protocol.tandem.v1 import gateway_pb2

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["DeviceGateway"]


@dataclass(frozen=True)
class MalformedMessage:
    """A request frame that did not parse as its message type."""

    type_name: str
    error: str

    def describe(self) -> str:
        """One line for the INVALID_ARGUMENT detail."""
        return f"request is not a valid {self.type_name}: {self.error[:200]}"


def _tolerant(message_cls: Any) -> Callable[[bytes], Any]:
    name = message_cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return message_cls.FromString(raw)
        except Exception as exc:  # DecodeError, or anything the parser raises on hostile bytes
            return MalformedMessage(name, str(exc) or type(exc).__name__)

    return parse


def _refuse_malformed_unary(handler):
    @functools.wraps(handler)
    async def wrapper(request, context):
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return await handler(request, context)

    return wrapper


def _refuse_malformed_stream(handler):
    @functools.wraps(handler)
    async def wrapper(request, context):
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        async for item in handler(request, context):
            yield item

    return wrapper


def add_gateway_handlers(servicer: Any, server: grpc.aio.Server) -> None:
    """Like the generated ``add_DeviceGatewayServicer_to_server``, with tolerant request parsing."""
    handlers = {}
    for method in SERVICE.methods:
        req = getattr(gateway_pb2, method.input_type.name)
        resp = getattr(gateway_pb2, method.output_type.name)
        impl = getattr(servicer, method.name)
        kw = {"request_deserializer": _tolerant(req), "response_serializer": resp.SerializeToString}
        if method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(impl, **kw)
        elif method.server_streaming and not method.client_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_refuse_malformed_stream(impl), **kw)
        elif not method.client_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_refuse_malformed_unary(impl), **kw)
        else:  # pragma: no cover - the service has no bidirectional methods
            raise TypeError(f"unsupported method kind: {method.name}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
