"""Gateway end to end in one process: register, upload/ack, auth, updates, heartbeat, health, reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transport_support import registered_client, running_gateway, sample_payload

from device.transport.client import GatewayClient
from device.transport.outbox import OutboxItem
from protocol.auth import bearer_metadata
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc


def _items(start: int, n: int, size: int) -> list[OutboxItem]:
    return [OutboxItem(seq, sample_payload(seq, size), {"k": str(seq)}, 1) for seq in range(start, start + n)]


async def test_upload_acks_highest_stored_and_is_idempotent(tmp_path):
    async with (
        running_gateway(tmp_path / "cloud") as gw,
        registered_client(tmp_path / "dev", gw.address) as client,
    ):
        first = _items(1, 5, 150_000)
        resp = await client.upload(first)  # 150 kB > 64 KiB chunks: multi-chunk samples
        assert (resp.acked_seq, resp.stored, resp.duplicates) == (5, 5, 0)
        again = await client.upload(_items(3, 4, 150_000))
        assert (again.acked_seq, again.stored, again.duplicates) == (6, 1, 3)
        stored = list(gw.samples.iter_samples("dev-1"))
        assert [s.seq for s in stored] == [1, 2, 3, 4, 5, 6]
        assert stored[2].payload == first[2].payload and stored[2].metadata == {"k": "3"}


async def test_missing_and_foreign_tokens_are_refused(tmp_path):
    async with (
        running_gateway(tmp_path / "cloud") as gw,
        registered_client(tmp_path / "a", gw.address, "dev-a") as a,
        registered_client(tmp_path / "b", gw.address, "dev-b") as b,
    ):
        record = gw.publish("dev-a", "v0", "v1", b"weights-for-a")
        stub = gateway_pb2_grpc.DeviceGatewayStub(a.channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(gateway_pb2.HeartbeatRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(gateway_pb2.HeartbeatRequest(), metadata=bearer_metadata("forged"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in b.fetch(record.update_id, 0):
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:  # taking over dev-a's id needs dev-a's token
            await stub.Register(
                gateway_pb2.RegisterRequest(device_id="dev-a", model_family="x"),
                metadata=bearer_metadata(b.identity.token),
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        chunks = [c async for c in a.fetch(record.update_id, 0)]
        assert b"".join(c.data for c in chunks) == b"weights-for-a"


async def test_enrollment_secret_is_checked(tmp_path):
    async with running_gateway(tmp_path / "cloud", enrollment_secret="s3cret", open_enrollment=False) as gw:
        from transport_support import device_config

        client = GatewayClient(device_config(tmp_path / "d", gw.address, enrollment_secret="wrong"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.register()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await client.close()
        client = GatewayClient(device_config(tmp_path / "d", gw.address, enrollment_secret="s3cret"))
        assert (await client.register()).device_id == "dev-1"
        await client.close()


async def test_fetch_resumes_from_offset_and_heartbeat(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "d", gw.address) as c:
        payload = bytes(range(256)) * 1000
        record = gw.publish("dev-1", "v0", "v1", payload, {"note": "x"})
        chunks = [ch async for ch in c.fetch(record.update_id, 100_000)]
        assert chunks[0].header.target_version == "v1" and chunks[0].offset == 100_000
        assert b"".join(ch.data for ch in chunks) == payload[100_000:]
        assert all(not ch.HasField("header") for ch in chunks[1:])
        hb = await c.heartbeat("ok", "v0", {"acc": 0.5}, 3)
        assert hb.latest_update_id == record.update_id
        assert gw.devices.get("dev-1").metrics == {"acc": 0.5, "outbox_depth": 3.0}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in c.fetch(record.update_id, len(payload) + 1):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_reflection(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        channel = grpc.aio.insecure_channel(gw.address)
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.DeviceGateway"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in call for s in r.list_services_response.service]
        assert "tandem.v1.DeviceGateway" in names and "grpc.health.v1.Health" in names
        await channel.close()


async def test_reregister_with_own_token_rotates_it(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "d", gw.address) as c:
        old = c.identity.token
        new_identity = await c.register()  # the client sends its current token
        assert new_identity.token != old
        stub = gateway_pb2_grpc.DeviceGatewayStub(c.channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(gateway_pb2.HeartbeatRequest(), metadata=bearer_metadata(old))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await c.heartbeat("ok", "v0", {}, 0)).server_unix_ms > 0
        gw.devices.revoke("dev-1")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.heartbeat("ok", "v0", {}, 0)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
