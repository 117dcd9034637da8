"""``tandem.v1.DeviceGateway`` implementation: auth, uploads, update serving, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import grpc

from cloud.config import GatewayConfig
from cloud.device_tokens import TokenCache
from cloud.devices import DeviceRecord, Devices, DeviceStateError, Heartbeat
from cloud.feature_bases import accepted_formats
from cloud.gateway.assembler import MAX_SEQ, ProtocolViolation
from cloud.gateway.budget import BudgetExhausted, MemoryBudget
from cloud.gateway.heartbeats import HeartbeatWriter
from cloud.gateway.metrics import GatewayMetrics
from cloud.gateway.upload import StreamIdle, UploadSession
from cloud.gateway.writer import GroupCommitWriter
from cloud.updates.base import UpdateRecord, UpdateRegistry
from common import clock as clocks
from common.faults import fault_point
from common.feature_basis import KNOWN_BASES
from protocol.auth import token_from_metadata
from protocol.limits import ACKED_SEQ_TRAILER, COHORT_RE, DEVICE_ID_RE, MAX_VERSION_CHARS, REJECTED_SEQ_TRAILER
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc

_MAX_FIELD_CHARS = 128
_MAX_CAPABILITIES_BYTES = 64 * 1024
log = logging.getLogger("tandem.gateway")


class DeviceGatewayServicer(gateway_pb2_grpc.DeviceGatewayServicer):
    """One instance per server; all blocking store work goes through the group-commit writer or threads."""

    def __init__(
        self,
        config: GatewayConfig,
        devices: Devices,
        writer: GroupCommitWriter,
        updates: UpdateRegistry,
        public_key_pem: bytes,
        metrics: GatewayMetrics,
        budget: MemoryBudget,
        validator: Executor,
    ) -> None:
        self.config = config
        self.devices = devices
        self.writer = writer
        self.updates = updates
        self.public_key_pem = public_key_pem
        self.metrics = metrics
        self.budget = budget
        self.validator = validator
        self.published = asyncio.Event()
        self.tokens = TokenCache(devices)
        self.heartbeats = HeartbeatWriter(devices)
        self.heartbeats.start()
        self._uploads = 0

    async def close(self) -> None:
        """Commit the queued heartbeats, stop watching the registry for token changes."""
        await self.heartbeats.close()
        self.tokens.close()

    def notify_published(self) -> None:
        """Wake WatchUpdates streams (publishes from this process; others are found by polling)."""
        self.published.set()
        self.published = asyncio.Event()

    async def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> DeviceRecord:
        token = token_from_metadata(context.invocation_metadata())
        if token is None:
            await self._abort(context, method, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        device = await self.tokens.authenticate(token)
        if device is None:
            await self._abort(context, method, grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked device token")
        await self._check_cert_binding(context, method, device.device_id)  # type: ignore[union-attr]
        return device  # type: ignore[return-value]

    async def _check_cert_binding(self, context: grpc.aio.ServicerContext, method: str, device_id: str) -> None:
        """With ``bind_client_cert_to_device``, the mTLS client certificate must name this device."""
        tls = self.config.tls
        if tls is None or tls.client_ca_file is None or not tls.bind_client_cert_to_device:
            return
        names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
        if device_id not in names:
            await self._abort(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {names or '(none)'} does not name device {device_id}",
            )

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, msg: str) -> Any:
        self.metrics.calls.labels(method, code.name).inc()
        await context.abort(code, msg)

    def _ok(self, method: str) -> None:
        self.metrics.calls.labels(method, "OK").inc()

    async def Register(self, request: gateway_pb2.RegisterRequest, context) -> gateway_pb2.RegisterResponse:
        m = "Register"
        problem = _register_problem(request)
        if problem:
            await self._abort(context, m, grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self._check_cert_binding(context, m, request.device_id)
        existing = await asyncio.to_thread(self.devices.get, request.device_id)
        code, msg = await self._enrollment_refusal(request, existing, context)
        if code is not None:
            await self._abort(context, m, code, msg)
        cohort = request.cohort if self.config.open_enrollment else (existing.cohort if existing else "")
        try:
            record, token = await asyncio.to_thread(
                self.devices.register,
                request.device_id,
                cohort=cohort,
                model_family=request.model_family,
                model_version=request.model_version,
                capabilities=_capabilities(request.capabilities),
            )
        except DeviceStateError as exc:  # revoked by the operator between the check and the write
            await self._abort(context, m, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        self._ok(m)
        return gateway_pb2.RegisterResponse(
            device_id=record.device_id,
            device_token=token,
            cohort=record.cohort,
            cloud_public_key_pem=self.public_key_pem,
            chunk_size=self.config.chunk_size,
            max_message_bytes=self.config.max_message_bytes,
            max_sample_bytes=self.config.max_sample_bytes,
            acked_seq=await self.writer.high_water(record.device_id),
            sample_formats=accepted_formats(),
            feature_bases=KNOWN_BASES.versions(),
        )

    async def _enrollment_refusal(
        self, request: gateway_pb2.RegisterRequest, existing: DeviceRecord | None, context
    ) -> tuple[grpc.StatusCode | None, str]:
        """Why this Register may not proceed (status and message), or ``(None, "")``."""
        device_id = request.device_id
        secret = self.config.enrollment_secret
        has_secret = secret is not None and hmac.compare_digest(request.enrollment_secret.encode(), secret.encode())
        if existing is not None and existing.revoked:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"device {device_id} was revoked; an operator must re-admit it (tandem-cloud devices add {device_id})"
            )
        if existing is not None and existing.provisioned:
            if has_secret or await asyncio.to_thread(
                self.devices.check_enrollment_code, device_id, request.enrollment_secret
            ):
                return None, ""
            return grpc.StatusCode.UNAUTHENTICATED, f"wrong or missing enrollment code for device {device_id}"
        if existing is not None:
            token = token_from_metadata(context.invocation_metadata())
            holder = await self.tokens.authenticate(token) if token else None
            if holder is None or holder.device_id != device_id:
                return grpc.StatusCode.PERMISSION_DENIED, (
                    f"device {device_id} is already registered; re-register with its token"
                )
            return None, ""
        if self.config.open_enrollment or has_secret:
            return None, ""
        if secret is not None:
            return grpc.StatusCode.UNAUTHENTICATED, "wrong or missing enrollment secret"
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"enrollment is closed and device {device_id} is not provisioned "
            f"(operator: tandem-cloud devices add {device_id})"
        )

    async def Upload(self, request_iterator: AsyncIterator[gateway_pb2.SampleChunk], context):
        m = "Upload"
        device = await self._authenticate(context, m)
        c = self.config
        if self._uploads >= c.max_upload_streams:
            await self._abort(
                context,
                m,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._uploads} uploads in progress (max_upload_streams); retry later",
            )
        self._uploads += 1
        try:
            return await self._upload(device, request_iterator, context)
        finally:
            self._uploads -= 1

    async def _upload(self, device: DeviceRecord, request_iterator, context) -> gateway_pb2.UploadResponse:
        m = "Upload"
        c = self.config
        session = UploadSession(
            device.device_id,
            chunk_size=c.chunk_size,
            max_sample_bytes=c.max_sample_bytes,
            stream_cap=c.stream_buffer_bytes,
            idle_timeout_s=c.upload_idle_timeout_s,
            budget=self.budget,
            writer=self.writer,
            validator=self.validator,
        )
        self.metrics.active_streams.labels(m).inc()
        try:
            refusal = await _receive(session, request_iterator)
            try:
                stored, duplicates = await session.settle()  # what was valid is kept even when refusing the rest
            except Exception as exc:  # the store failed: nothing of this call is acked; the device resends
                log.error("sample store failed: %s", exc)
                await self._abort(context, m, grpc.StatusCode.UNAVAILABLE, f"sample store failed: {exc}")
            fault_point("gateway.after_store")  # test-only: kill -9 between store and ack (common/faults.py)
            self.metrics.samples_stored.inc(stored)
            self.metrics.samples_duplicate.inc(duplicates)
            acked = session.high_water  # from the commit itself; a stream that stored nothing asks the store
            if acked is None:
                acked = await self.writer.high_water(device.device_id)
            if refusal is not None:
                code, msg, seq = refusal
                trailers = [(ACKED_SEQ_TRAILER, str(acked))]
                if seq is not None:
                    trailers.append((REJECTED_SEQ_TRAILER, str(seq)))
                context.set_trailing_metadata(tuple(trailers))
                await self._abort(context, m, code, msg)
        finally:
            self.metrics.active_streams.labels(m).dec()
            await session.close()
        self._ok(m)
        return gateway_pb2.UploadResponse(acked_seq=acked, stored=stored, duplicates=duplicates)

    async def _authorized_update(self, context, method: str, device: DeviceRecord, update_id: int) -> UpdateRecord:
        if not 1 <= update_id <= MAX_SEQ:
            await self._abort(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update_id must be between 1 and {MAX_SEQ}",
            )
        record = await asyncio.to_thread(self.updates.get, update_id)
        if record is None:
            await self._abort(context, method, grpc.StatusCode.NOT_FOUND, f"no update {update_id}")
        assert record is not None
        mine = record.device_id == device.device_id or (record.cohort != "" and record.cohort == device.cohort)
        if not mine:
            await self._abort(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"update {update_id} is not addressed to device {device.device_id}",
            )
        return record

    async def FetchUpdate(self, request: gateway_pb2.FetchUpdateRequest, context):
        m = "FetchUpdate"
        device = await self._authenticate(context, m)
        record = await self._authorized_update(context, m, device, request.update_id)
        if request.offset > record.size:
            await self._abort(
                context,
                m,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"offset {request.offset} beyond update size {record.size}",
            )
        self.metrics.active_streams.labels(m).inc()
        try:
            offset = request.offset
            header = record.to_proto()
            first = True
            while first or offset < record.size:
                n = min(self.config.chunk_size, record.size - offset)
                data = await asyncio.to_thread(self.updates.read_payload, record.update_id, offset, n) if n else b""
                if len(data) != n:
                    await self._abort(context, m, grpc.StatusCode.DATA_LOSS, f"update {record.update_id} blob short")
                yield gateway_pb2.UpdateChunk(header=header if first else None, offset=offset, data=data)
                self.metrics.update_bytes.inc(n)
                offset += n
                first = False
        finally:
            self.metrics.active_streams.labels(m).dec()
        self._ok(m)

    async def WatchUpdates(self, request: gateway_pb2.WatchUpdatesRequest, context):
        m = "WatchUpdates"
        device = await self._authenticate(context, m)
        if len(request.current_version) > MAX_VERSION_CHARS:
            await self._abort(
                context, m, grpc.StatusCode.INVALID_ARGUMENT, f"current_version exceeds {MAX_VERSION_CHARS} chars"
            )
        if request.after_update_id > MAX_SEQ:
            await self._abort(context, m, grpc.StatusCode.INVALID_ARGUMENT, f"after_update_id above {MAX_SEQ}")
        if request.current_version:
            await asyncio.to_thread(self.devices.touch, device.device_id, request.current_version)
        cursor = request.after_update_id
        self.metrics.active_streams.labels(m).inc()
        try:
            while True:
                event = self.published
                for record in await asyncio.to_thread(self.updates.for_device, device.device_id, device.cohort, cursor):
                    yield gateway_pb2.UpdateNotice(header=record.to_proto())
                    cursor = record.update_id
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=self.config.watch_poll_interval_s)
        finally:
            self.metrics.active_streams.labels(m).dec()

    async def Heartbeat(self, request: gateway_pb2.HeartbeatRequest, context) -> gateway_pb2.HeartbeatResponse:
        m = "Heartbeat"
        device = await self._authenticate(context, m)
        metrics = dict(request.metrics)
        metrics["outbox_depth"] = float(request.outbox_depth)
        if request.downlink_bytes_per_s:  # the link capacity the trainer sizes updates by
            metrics["downlink_bytes_per_s"] = float(request.downlink_bytes_per_s)
        if request.uplink_bytes_per_s:
            metrics["uplink_bytes_per_s"] = float(request.uplink_bytes_per_s)
        if len(json.dumps(metrics)) > 64 * 1024:
            await self._abort(context, m, grpc.StatusCode.INVALID_ARGUMENT, "heartbeat metrics exceed 64 KiB")
        beat = Heartbeat(device.device_id, request.status[:256], request.applied_version[:MAX_VERSION_CHARS], metrics)
        _, latest, acked = await asyncio.gather(
            self.heartbeats.record(beat),  # committed with the other heartbeats that came in meanwhile
            asyncio.to_thread(self._heartbeat_reads, device, request),
            self.writer.high_water(device.device_id),
        )
        self._ok(m)
        return gateway_pb2.HeartbeatResponse(
            server_unix_ms=_now_ms(),
            acked_seq=acked,
            latest_update_id=latest,
            sample_formats=accepted_formats(),
            feature_bases=KNOWN_BASES.versions(),
        )

    def _heartbeat_reads(self, device: DeviceRecord, request: gateway_pb2.HeartbeatRequest) -> int:
        """On a worker thread: records a reported rollback (rare), returns the latest update id addressed to the
        device."""
        if request.rolled_back_from:
            self.devices.record_rollback(
                device.device_id,
                request.rolled_back_from[:128],
                request.applied_version[:128],
                request.rollback_reason[:256],
            )
        return self.updates.latest_for_device(device.device_id, device.cohort)


def _now_ms() -> int:
    return clocks.current().now_ms()


async def _receive(
    session: UploadSession, requests: AsyncIterator[gateway_pb2.SampleChunk]
) -> tuple[grpc.StatusCode, str, int | None] | None:
    """Run the stream; what to refuse it with (status, message, rejected seq), or None when it was fine."""
    try:
        await session.receive(requests)
    except ProtocolViolation as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.sample_seq
    except BudgetExhausted as exc:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
    except StreamIdle as exc:
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), None
    return None


def _register_problem(request: gateway_pb2.RegisterRequest) -> str | None:
    """Why a RegisterRequest is malformed, or None."""
    if not DEVICE_ID_RE.match(request.device_id):
        return "device_id must be 1-128 chars of [A-Za-z0-9._-]"
    if not COHORT_RE.match(request.cohort):
        return "cohort must be at most 128 chars of [A-Za-z0-9._-]"
    if not request.model_family:
        return "model_family must not be empty"
    if len(request.model_family) > _MAX_FIELD_CHARS or len(request.model_version) > _MAX_FIELD_CHARS:
        return f"model_family and model_version must be at most {_MAX_FIELD_CHARS} chars"
    if len(request.enrollment_secret) > 1024:
        return "enrollment_secret must be at most 1024 chars"
    if request.capabilities.ByteSize() > _MAX_CAPABILITIES_BYTES:
        return f"capabilities exceed {_MAX_CAPABILITIES_BYTES} bytes"
    return None


def _capabilities(caps: gateway_pb2.Capabilities) -> dict:
    return {
        "accelerators": list(caps.accelerators),
        "memory_bytes": caps.memory_bytes,
        "quantization_schemes": list(caps.quantization_schemes),
        "extra": dict(caps.extra),
    }
