"""``tandem.v1.DeviceGateway`` implementation: auth, uploads, update serving, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cloud.config import GatewayConfig
from cloud.devices import DeviceRecord, DeviceRegistry
from cloud.gateway.assembler import MAX_SEQ, ProtocolViolation, SampleAssembler, verify
from cloud.gateway.metrics import GatewayMetrics
from cloud.gateway.writer import GroupCommitWriter
from cloud.samples.base import Sample
from cloud.updates.base import UpdateRecord, UpdateRegistry
from protocol.auth import token_from_metadata
from protocol.limits import REJECTED_SEQ_TRAILER
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc

_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_COHORT_RE = re.compile(r"^[A-Za-z0-9._-]{0,128}$")
_FLUSH_SAMPLES = 64
_FLUSH_BYTES = 4 * 1024 * 1024
_THREAD_VERIFY_BYTES = 256 * 1024


class DeviceGatewayServicer(gateway_pb2_grpc.DeviceGatewayServicer):
    """One instance per server; all blocking store work goes through the group-commit writer or threads."""

    def __init__(
        self,
        config: GatewayConfig,
        devices: DeviceRegistry,
        writer: GroupCommitWriter,
        updates: UpdateRegistry,
        public_key_pem: bytes,
        metrics: GatewayMetrics,
    ) -> None:
        self.config = config
        self.devices = devices
        self.writer = writer
        self.updates = updates
        self.public_key_pem = public_key_pem
        self.metrics = metrics
        self.published = asyncio.Event()

    def notify_published(self) -> None:
        """Wake WatchUpdates streams (publishes from this process; others are found by polling)."""
        self.published.set()
        self.published = asyncio.Event()

    async def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> DeviceRecord:
        token = token_from_metadata(context.invocation_metadata())
        if token is None:
            await self._abort(context, method, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        device = self.devices.authenticate(token)
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
        secret = self.config.enrollment_secret
        if secret is not None and not hmac.compare_digest(request.enrollment_secret.encode(), secret.encode()):
            await self._abort(context, m, grpc.StatusCode.UNAUTHENTICATED, "wrong or missing enrollment secret")
        if not _ID_RE.match(request.device_id):
            await self._abort(
                context,
                m,
                grpc.StatusCode.INVALID_ARGUMENT,
                "device_id must be 1-128 chars of [A-Za-z0-9._-]",
            )
        if not _COHORT_RE.match(request.cohort):
            await self._abort(
                context,
                m,
                grpc.StatusCode.INVALID_ARGUMENT,
                "cohort must be at most 128 chars of [A-Za-z0-9._-]",
            )
        if not request.model_family:
            await self._abort(context, m, grpc.StatusCode.INVALID_ARGUMENT, "model_family must not be empty")
        await self._check_cert_binding(context, m, request.device_id)
        existing = self.devices.get(request.device_id)
        if existing is not None and not existing.revoked:
            token = token_from_metadata(context.invocation_metadata())
            holder = self.devices.authenticate(token) if token else None
            if holder is None or holder.device_id != request.device_id:
                await self._abort(
                    context,
                    m,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"device {request.device_id} is already registered; re-register with its token",
                )
        caps = request.capabilities
        record, token = self.devices.register(
            request.device_id,
            cohort=request.cohort,
            model_family=request.model_family,
            model_version=request.model_version,
            capabilities={
                "accelerators": list(caps.accelerators),
                "memory_bytes": caps.memory_bytes,
                "quantization_schemes": list(caps.quantization_schemes),
                "extra": dict(caps.extra),
            },
        )
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
        )

    async def Upload(self, request_iterator: AsyncIterator[gateway_pb2.SampleChunk], context):
        m = "Upload"
        device = await self._authenticate(context, m)
        assembler = SampleAssembler(device.device_id, self.config.chunk_size, self.config.max_sample_bytes)
        pending: list[Sample] = []
        pending_bytes = 0
        writes: list[asyncio.Task[list[bool]]] = []  # commits overlap with receiving the rest of the stream
        self.metrics.active_streams.labels(m).inc()
        try:
            try:
                async for chunk in request_iterator:
                    done = assembler.add(chunk)
                    if done is None:
                        continue
                    sample, info = done
                    if len(sample.payload) >= _THREAD_VERIFY_BYTES:  # hash off the event loop
                        await asyncio.to_thread(verify, sample, info)
                    else:
                        verify(sample, info)
                    pending.append(sample)
                    pending_bytes += len(sample.payload)
                    if len(pending) >= _FLUSH_SAMPLES or pending_bytes >= _FLUSH_BYTES:
                        writes.append(asyncio.ensure_future(self.writer.put(pending)))
                        pending, pending_bytes = [], 0
                assembler.finish()
            except ProtocolViolation as exc:
                writes.append(asyncio.ensure_future(self.writer.put(pending)))
                await self._settle(writes)  # keep what was valid; the device resends the rest
                if exc.sample_seq is not None:
                    context.set_trailing_metadata(((REJECTED_SEQ_TRAILER, str(exc.sample_seq)),))
                await self._abort(context, m, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except BaseException:
                for w in writes:
                    w.cancel()
                raise
            writes.append(asyncio.ensure_future(self.writer.put(pending)))
            stored, duplicates = await self._settle(writes)
            acked = await self.writer.high_water(device.device_id)
        finally:
            self.metrics.active_streams.labels(m).dec()
        self._ok(m)
        return gateway_pb2.UploadResponse(acked_seq=acked, stored=stored, duplicates=duplicates)

    async def _settle(self, writes: list[asyncio.Task[list[bool]]]) -> tuple[int, int]:
        """Wait for every queued write; returns (new, duplicate) counts."""
        results = [r for batch in await asyncio.gather(*writes) for r in batch]
        new = sum(results)
        self.metrics.samples_stored.inc(new)
        self.metrics.samples_duplicate.inc(len(results) - new)
        return new, len(results) - new

    async def _authorized_update(self, context, method: str, device: DeviceRecord, update_id: int) -> UpdateRecord:
        if not 1 <= update_id <= MAX_SEQ:
            await self._abort(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update_id must be between 1 and {MAX_SEQ}",
            )
        record = self.updates.get(update_id)
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
        if request.current_version:
            self.devices.touch(device.device_id, request.current_version)
        if request.after_update_id > MAX_SEQ:
            await self._abort(context, m, grpc.StatusCode.INVALID_ARGUMENT, f"after_update_id above {MAX_SEQ}")
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
        self.devices.heartbeat(
            device.device_id,
            status=request.status[:256],
            applied_version=request.applied_version[:128],
            metrics=metrics,
        )
        if request.rolled_back_from:
            self.devices.record_rollback(
                device.device_id,
                request.rolled_back_from[:128],
                request.applied_version[:128],
                request.rollback_reason[:256],
            )
        self._ok(m)
        return gateway_pb2.HeartbeatResponse(
            server_unix_ms=_now_ms(),
            acked_seq=await self.writer.high_water(device.device_id),
            latest_update_id=max(
                (r.update_id for r in self.updates.for_device(device.device_id, device.cohort)), default=0
            ),
        )


def _now_ms() -> int:
    return int(time.time() * 1000)
