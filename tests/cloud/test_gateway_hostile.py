"""Hostile uploads (issue 19): bad safetensors headers, bad content, corrupt frames, long versions, `bearer`.

Each answers INVALID_ARGUMENT with a message (never UNKNOWN), names the refused seq and the acked seq in
trailers, logs no traceback, and leaves the server serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import struct

import grpc
import pytest
from transport_support import registered_client, running_gateway, sample_payload

from protocol.auth import AUTHORIZATION_KEY
from protocol.limits import ACKED_SEQ_TRAILER, REJECTED_SEQ_TRAILER
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc, tensors_pb2


def safetensors_bytes(header: object, body: bytes = b"", raw_header: bytes | None = None) -> bytes:
    """Safetensors framing around any header (valid or not)."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def chunk(seq: int, data: bytes, fmt: str = "safetensors") -> gateway_pb2.SampleChunk:
    """A one-chunk sample whose size and sha256 are right, whatever the bytes are."""
    info = tensors_pb2.PayloadInfo(format=fmt, size=len(data), sha256=hashlib.sha256(data).digest())
    return gateway_pb2.SampleChunk(seq=seq, offset=0, data=data, payload=info)


def chunks(seq: int, data: bytes, size: int = 64 * 1024) -> list[gateway_pb2.SampleChunk]:
    """The sample in ``size`` pieces, the first with the declaration."""
    first = chunk(seq, data[:size])
    first.payload.size, first.payload.sha256 = len(data), hashlib.sha256(data).digest()
    rest = [gateway_pb2.SampleChunk(seq=seq, offset=o, data=data[o : o + size]) for o in range(size, len(data), size)]
    return [first, *rest]


def _entry(**kw):
    return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **kw}


HOSTILE_HEADERS = {
    "no dtype": {"t": {"shape": [2], "data_offsets": [0, 8]}},
    "no shape": {"t": {"dtype": "F32", "data_offsets": [0, 8]}},
    "negative shape": {"t": _entry(shape=[-2])},
    "huge shape": {"t": _entry(shape=[2**62, 2**62])},
    "shape not a list": {"t": _entry(shape="2")},
    "string data_offsets": {"t": _entry(data_offsets=["0", "8"])},
    "metadata not a dict": {"__metadata__": ["format"], "t": _entry()},
    "metadata values not strings": {"__metadata__": {"format": {"x": 1}}, "t": _entry()},
    "entry not an object": {"t": [1, 2]},
    "unknown dtype": {"t": _entry(dtype="F128")},
    "shape disagrees with offsets": {"t": _entry(shape=[3])},
    "overlapping tensors": {"a": _entry(), "b": _entry()},
    "bool dims": {"t": _entry(shape=[True, True], data_offsets=[0, 4])},
}


async def _refused(stub, meta, stream) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Upload(iter(stream), metadata=meta, timeout=20)
    return err.value


def _trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


async def test_hostile_headers_and_content_are_invalid_argument_with_trailers(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with registered_client_gateway(tmp_path) as (gw, client):
        stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
        meta = client._metadata
        good = await stub.Upload(iter([chunk(1, sample_payload(1, 800))]), metadata=meta, timeout=20)
        assert good.acked_seq == 1
        cases = {name: safetensors_bytes(h, b"\0" * 8) for name, h in HOSTILE_HEADERS.items()}
        cases["100,000 levels deep"] = safetensors_bytes(None, b"", raw_header=b"{" + b'"a":[' * 100_000)
        cases["deep but closed"] = safetensors_bytes(
            None, b"", raw_header=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        )
        cases["valid safetensors, not a sample"] = safetensors_bytes({"t": _entry()}, b"\0" * 8)
        seq = 10
        for name, data in cases.items():
            seq += 1
            err = await _refused(stub, meta, chunks(seq, data))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
            assert f"seq {seq}" in err.details(), name
            assert _trailers(err) == {REJECTED_SEQ_TRAILER: str(seq), ACKED_SEQ_TRAILER: "1"}, name
        opaque = sample_payload(2, 800)
        err = await _refused(stub, meta, [chunk(seq + 1, opaque, fmt="opaque")])  # a sample declared as opaque
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "format" in err.details()
        err = await _refused(stub, meta, [chunk(seq + 2, b"plain bytes, not safetensors", fmt="opaque")])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [s.seq for s in gw.samples.iter_samples("dev-1")] == [1]  # nothing hostile was stored
        assert (await client.heartbeat("ok", "v0", {}, 0)).acked_seq == 1  # still serving
    assert not [r for r in caplog.records if r.exc_info], "a hostile upload logged a traceback"


async def test_corrupt_protobuf_frames_are_invalid_argument(tmp_path):
    async with registered_client_gateway(tmp_path) as (gw, client):
        ch = client.channel
        meta = client._metadata
        raw = {"request_serializer": None, "response_deserializer": None}
        upload = ch.stream_unary("/tandem.v1.DeviceGateway/Upload", **raw)
        good = chunk(1, sample_payload(1, 800)).SerializeToString()
        for frames in ([b"\xff\xff\xff"], [good, b"\x0a\xff\xff\xff\xff\x0f"], [b"\x08"]):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload(iter(frames), metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "SampleChunk" in err.value.details()
        for method in ("Register", "Heartbeat"):
            call = ch.unary_unary(f"/tandem.v1.DeviceGateway/{method}", **raw)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"\xff\xff\xff", metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
        watch = ch.unary_stream("/tandem.v1.DeviceGateway/WatchUpdates", **raw)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in watch(b"\xff\xff\xff", metadata=meta, timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [s.seq for s in gw.samples.iter_samples("dev-1")] == [1]  # the good chunk before the bad frame
        assert (await client.heartbeat("ok", "v0", {}, 0)).acked_seq == 1


async def test_watch_current_version_has_a_length_limit(tmp_path):
    async with registered_client_gateway(tmp_path) as (gw, client):
        watch = client.watch("v" * 900_000, 0)  # below the message limit of the test gateway
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "current_version" in err.value.details()
        assert gw.devices.get("dev-1").applied_version == ""
    with sqlite3.connect(tmp_path / "cloud" / "devices.db") as db:
        assert db.execute("SELECT MAX(LENGTH(applied_version)) FROM devices").fetchone()[0] <= 128


async def test_bearer_scheme_is_case_insensitive(tmp_path):
    async with registered_client_gateway(tmp_path) as (_, client):
        stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
        for scheme in ("bearer", "BEARER", "Bearer"):
            md = ((AUTHORIZATION_KEY, f"{scheme} {client.identity.token}"),)
            assert (await stub.Heartbeat(gateway_pb2.HeartbeatRequest(), metadata=md)).server_unix_ms > 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Heartbeat(gateway_pb2.HeartbeatRequest(), metadata=((AUTHORIZATION_KEY, "Basic abc"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


class registered_client_gateway:  # noqa: N801 (used like a function)
    """``async with registered_client_gateway(tmp_path) as (gateway, client)``."""

    def __init__(self, tmp_path, **overrides):
        self._gw = running_gateway(tmp_path / "cloud", **overrides)
        self._tmp = tmp_path

    async def __aenter__(self):
        gw = await self._gw.__aenter__()
        self._client = registered_client(self._tmp / "dev", gw.address)
        return gw, await self._client.__aenter__()

    async def __aexit__(self, *exc):
        await self._client.__aexit__(*exc)
        await self._gw.__aexit__(*exc)
