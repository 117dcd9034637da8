"""Format /2 at the gateway: announced at Register and Heartbeat, stored when its basis is known, refused with a
clear INVALID_ARGUMENT otherwise, and fuzzed (hypothesis) without UNKNOWN or INTERNAL answers."""

from __future__ import annotations

import hashlib
import random

import grpc
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transport_support import registered_client, running_gateway

from common.feature_basis import fit_basis, load_basis
from common.feature_codec import FORMAT_V2, Rate
from common.sample_codec import FORMAT, SampleCoding, UploadSample, decode_sample, encode_sample
from device.transport.outbox import OutboxItem
from device.transport.retry import is_local_send_failure
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc, tensors_pb2
from sim.zoo.reference import reference_root

SHIPPED = load_basis(reference_root("base") / "device")
assert SHIPPED is not None


def v2_payload(i: int, basis=SHIPPED, rate: Rate = Rate(8, 4)) -> bytes:
    g = torch.Generator().manual_seed(i)
    sample = UploadSample(torch.randn(72, 64, generator=g), torch.arange(0, 144, 2), 144, f"question {i} ?",
                          torch.tensor([4, 2]), torch.tensor([0.5, 0.25]), {"confidence": 0.5})  # fmt: skip
    return encode_sample(sample, SampleCoding(basis, rate))


def chunk(seq: int, data: bytes, fmt: str = "opaque") -> gateway_pb2.SampleChunk:
    info = tensors_pb2.PayloadInfo(format=fmt, size=len(data), sha256=hashlib.sha256(data).digest())
    return gateway_pb2.SampleChunk(seq=seq, offset=0, data=data, payload=info)


async def test_the_gateway_announces_v2_and_stores_samples_on_a_known_basis(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "dev", gw.address) as client:
        ident = client.identity
        assert FORMAT in ident.sample_formats and FORMAT_V2 in ident.sample_formats
        assert SHIPPED.version in ident.feature_bases
        beat = await client.heartbeat("ok", "v0", {}, 0)
        assert FORMAT_V2 in beat.sample_formats and SHIPPED.version in beat.feature_bases
        data = v2_payload(1)
        ack = await client.upload([OutboxItem(1, data, {}, 0)])  # the client describes it (opaque)
        assert ack.acked_seq == 1
        stored = [s.payload for s in gw.samples.iter_samples("dev-1")]
        assert stored == [data] and decode_sample(stored[0]).features.shape == (72, 64)


async def test_v2_on_an_unknown_basis_or_declared_safetensors_is_invalid_argument(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "dev", gw.address) as client:
        stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
        stranger = fit_basis(torch.randn(500, 64, generator=torch.Generator().manual_seed(9)))
        cases = {
            "does not know": chunk(5, v2_payload(5, basis=stranger)),
            "declared safetensors": chunk(6, v2_payload(6), fmt="safetensors"),
        }
        for expected, message in cases.items():
            try:
                await stub.Upload(iter([message]), metadata=client._metadata, timeout=20)
                raise AssertionError("accepted")
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in err.details(), err.details()
                assert f"seq {message.seq}" in err.details()
        assert list(gw.samples.iter_samples("dev-1")) == []


BASE = v2_payload(7)


def _mutate(seed: int) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(BASE)
    for _ in range(rnd.randint(1, 4)):
        if len(data) < 6:
            break
        op = rnd.randrange(3)
        if op == 0:
            data[rnd.randrange(4, len(data))] = rnd.randrange(256)
        elif op == 1:
            del data[rnd.randrange(4, len(data)) :]
        else:
            data[rnd.randrange(4, len(data)) : rnd.randrange(4, len(data))] = rnd.randbytes(rnd.randint(1, 40))
    return bytes(data)


payloads = st.one_of(
    st.integers(0, 2**32).map(_mutate),
    st.binary(max_size=200).map(lambda b: b"TUS2" + b),
)


def test_fuzzed_v2_uploads_never_answer_unknown_or_internal(tmp_path, loop):
    gw_cm = running_gateway(tmp_path / "cloud")
    gw = loop.run_until_complete(gw_cm.__aenter__())
    client_cm = registered_client(tmp_path / "dev", gw.address)
    client = loop.run_until_complete(client_cm.__aenter__())
    stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
    seen: set[str] = set()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payloads)
    def check(data):
        async def call():
            try:
                await stub.Upload(iter([chunk(1, data)]), metadata=client._metadata, timeout=10)
                seen.add("OK")
            except grpc.aio.AioRpcError as err:
                if is_local_send_failure(err):
                    return
                assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), err.details()
                assert err.details()
                seen.add(err.code().name)

        loop.run_until_complete(call())

    try:
        check()
        assert "INVALID_ARGUMENT" in seen
        ok = loop.run_until_complete(client.upload([OutboxItem(2**62, BASE, {}, 0)]))
        assert ok.acked_seq == 2**62  # still serving, and still storing valid /2 samples
    finally:
        loop.run_until_complete(client_cm.__aexit__(None, None, None))
        loop.run_until_complete(gw_cm.__aexit__(None, None, None))
