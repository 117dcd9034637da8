"""Malformed, oversize, inconsistent uploads get INVALID_ARGUMENT with a message; the server keeps serving."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transport_support import registered_client, running_gateway, sample_payload

from protocol.payload import describe_payload
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc, tensors_pb2

CHUNK = 64 * 1024


def _chunk(seq, offset, data, size=None, digest=None, with_info=True, metadata=None):
    msg = gateway_pb2.SampleChunk(seq=seq, offset=offset, data=data, metadata=metadata or {})
    if with_info:
        msg.payload.CopyFrom(
            tensors_pb2.PayloadInfo(
                format=describe_payload(data).format,
                size=len(data) if size is None else size,
                sha256=hashlib.sha256(data).digest() if digest is None else digest,
            )
        )
    return msg


def _bad_streams():
    good = b"abc"
    return st.one_of(
        st.builds(lambda d: [_chunk(1, 0, d, digest=b"\x00" * 32)], st.binary(min_size=1, max_size=100)),
        st.builds(lambda n: [_chunk(1, 0, good, size=3 + n)], st.integers(1, 1000)),  # stream ends short
        st.builds(lambda n: [_chunk(1, 0, good, size=n)], st.integers(0, 2)),  # more data than declared
        st.builds(lambda o: [_chunk(1, o, good)], st.integers(1, 10**12)),  # first offset not 0
        st.just([_chunk(0, 0, good)]),  # seq 0
        st.builds(lambda s: [_chunk(s, 0, good), _chunk(s, 0, good)], st.integers(1, 2**63 - 2)),  # seq repeats
        st.builds(lambda s: [_chunk(s, 0, good)], st.integers(2**63, 2**64 - 1)),  # seq beyond int64
        st.just([_chunk(1, 0, good, with_info=False)]),  # no payload info
        st.builds(lambda d: [_chunk(1, 0, good, digest=d)], st.binary(max_size=31)),  # short digest
        st.just([_chunk(1, 0, b"x" * (CHUNK + 1), size=CHUNK + 1)]),  # chunk above chunk_size
        st.just([_chunk(1, 0, b"", size=10**12)]),  # sample above max_sample_bytes
        st.builds(lambda k: [_chunk(1, 0, good, metadata={k: "v" * 5000})], st.text(min_size=1, max_size=5)),
        st.builds(
            lambda n: [_chunk(1, 0, b"y" * 100, size=200), _chunk(2, 100, b"y" * 100, with_info=False)],
            st.integers(0, 3),
        ),  # second sample starts before first completes
        st.builds(
            lambda b: [gateway_pb2.SampleChunk.FromString(b"")] if not b else [_chunk(1, 0, b, size=0)],
            st.binary(min_size=1, max_size=50),
        ),
    )


def test_bad_uploads_are_invalid_argument(tmp_path, loop):
    async def setup():
        cm_gw = running_gateway(tmp_path / "cloud")
        gw = await cm_gw.__aenter__()
        cm_c = registered_client(tmp_path / "dev", gw.address)
        client = await cm_c.__aenter__()
        return cm_gw, gw, cm_c, client

    cm_gw, gw, cm_c, client = loop.run_until_complete(setup())
    stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
    meta = client._metadata
    seen: list[str] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_bad_streams())
    def check(stream):
        async def call():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Upload(iter(stream), metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details()
            seen.append(err.value.details())

        loop.run_until_complete(call())

    try:
        check()
        last = 2**63 - 1  # the largest valid seq, above every valid one the strategies generate
        fine = sample_payload(1, 1000)
        ok = loop.run_until_complete(stub.Upload(iter([_chunk(last, 0, fine)]), metadata=meta, timeout=10))
        assert ok.acked_seq == last and ok.stored == 1
        assert len(seen) >= 10
    finally:
        loop.run_until_complete(cm_c.__aexit__(None, None, None))
        loop.run_until_complete(cm_gw.__aexit__(None, None, None))


async def test_message_above_transport_limit_is_refused_and_server_lives(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "d", gw.address) as c:
        stub = gateway_pb2_grpc.DeviceGatewayStub(
            grpc.aio.insecure_channel(gw.address, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])
        )
        big = _chunk(1, 0, b"z" * (2 * 1024 * 1024))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Upload(iter([big]), metadata=c._metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await c.heartbeat("ok", "v0", {}, 0)).server_unix_ms > 0


async def test_valid_samples_before_a_bad_one_are_kept(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "d", gw.address) as c:
        stub = gateway_pb2_grpc.DeviceGatewayStub(c.channel)
        one, two, three = (sample_payload(i, 1000) for i in (1, 2, 3))
        stream = [_chunk(1, 0, one), _chunk(2, 0, two), _chunk(3, 0, three, digest=b"\x01" * 32)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Upload(iter(stream), metadata=c._metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "seq 3" in err.value.details()
        assert [s.seq for s in gw.samples.iter_samples("dev-1")] == [1, 2]


async def test_register_validation(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        channel = grpc.aio.insecure_channel(gw.address)
        stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
        for req in (
            gateway_pb2.RegisterRequest(device_id="", model_family="m"),
            gateway_pb2.RegisterRequest(device_id="bad id!", model_family="m"),
            gateway_pb2.RegisterRequest(device_id="ok", model_family=""),
            gateway_pb2.RegisterRequest(device_id="ok", model_family="m", cohort="x" * 200),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Register(req)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
        await channel.close()


def test_fetch_and_watch_arguments_never_crash_the_handler(tmp_path, loop):
    async def setup():
        cm_gw = running_gateway(tmp_path / "cloud")
        gw = await cm_gw.__aenter__()
        cm_c = registered_client(tmp_path / "dev", gw.address)
        client = await cm_c.__aenter__()
        gw.publish("dev-1", "v0", "v1", b"p" * 100)
        return cm_gw, cm_c, client

    cm_gw, cm_c, client = loop.run_until_complete(setup())
    expected = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.text(max_size=300))
    def check(update_id, offset, version):
        async def call():
            try:
                async for _ in client.fetch(update_id, offset):
                    pass
            except grpc.aio.AioRpcError as err:
                assert err.code() in expected, err.details()
            else:
                assert update_id == 1 and offset <= 100
            watch = client.watch(version, offset)
            try:
                notice = await asyncio.wait_for(watch.read(), timeout=5 if offset == 0 else 0.05)
                assert offset == 0 and notice.header.update_id == 1
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and offset > 2**63 - 1
            except asyncio.TimeoutError:
                assert offset >= 1  # nothing after the only update: the stream waits
            finally:
                watch.cancel()

        loop.run_until_complete(call())

    try:
        check()
        assert loop.run_until_complete(client.heartbeat("ok", "v0", {}, 0)).latest_update_id == 1
    finally:
        loop.run_until_complete(cm_c.__aexit__(None, None, None))
        loop.run_until_complete(cm_gw.__aexit__(None, None, None))
