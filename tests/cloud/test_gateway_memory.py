"""Bounded memory: a global buffer budget (RESOURCE_EXHAUSTED), per-stream caps, idle streams ended, and the
server's RSS under a configured bound with many concurrent large streams (issue 19)."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from transport_support import gateway_process, registered_client, running_gateway, sample_payload

from device.transport.client import GatewayClient
from device.transport.retry import is_local_send_failure
from protocol.limits import ACKED_SEQ_TRAILER
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc, tensors_pb2

MiB = 1024 * 1024


async def _stalling_stream(seq: int, data: bytes, chunk: int, send: int, release: asyncio.Event, sent: list):
    """Chunks of one sample: the first ``send`` bytes, then wait for ``release``, then the rest."""
    info = tensors_pb2.PayloadInfo(format="safetensors", size=len(data), sha256=hashlib.sha256(data).digest())
    for offset in range(0, len(data), chunk):
        if offset >= send:
            await release.wait()
        msg = gateway_pb2.SampleChunk(seq=seq, offset=offset, data=data[offset : offset + chunk])
        if offset == 0:
            msg.payload.CopyFrom(info)
        sent.append(len(msg.data))
        yield msg


def _vm(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


async def test_budget_full_answers_resource_exhausted_and_frees_on_end(tmp_path):
    overrides = dict(max_sample_bytes=MiB, max_buffered_bytes=2 * MiB + 256 * 1024, buffer_wait_s=0.3)
    async with (
        running_gateway(tmp_path / "cloud", **overrides) as gw,
        registered_client(tmp_path / "d", gw.address) as client,
    ):
        stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
        meta = client._metadata
        big = sample_payload(1, MiB - 4096)
        release = asyncio.Event()
        sent: list[list[int]] = [[], []]
        holders = [
            asyncio.ensure_future(
                stub.Upload(
                    _stalling_stream(s, big, 64 * 1024, len(big) - 100_000, release, sent[s - 1]),
                    metadata=meta,
                    timeout=30,
                )
            )
            for s in (1, 2)
        ]
        while gw.budget.used < 2 * (len(big) - 200_000):  # both partial samples held
            await asyncio.sleep(0.02)
        third: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            never = asyncio.Event()  # the third client waits after its first chunk: no write races the answer
            await stub.Upload(_stalling_stream(3, big, 64 * 1024, 64 * 1024, never, third), metadata=meta)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.value.details()
        assert dict(err.value.trailing_metadata())[ACKED_SEQ_TRAILER] == "0"
        assert gw.budget.used <= gw.budget.limit
        release.set()
        results = await asyncio.gather(*holders, return_exceptions=True)
        assert all(not isinstance(r, BaseException) for r in results), results
        assert gw.budget.used == 0 and gw.budget.peak <= gw.budget.limit
        ok = await stub.Upload(_stalling_stream(3, big, 64 * 1024, len(big), release, []), metadata=meta)
        assert ok.acked_seq == 3 and gw.budget.used == 0


async def test_silent_stream_is_ended_and_its_buffers_freed(tmp_path):
    async with (
        running_gateway(tmp_path / "cloud", upload_idle_timeout_s=0.5) as gw,
        registered_client(tmp_path / "d", gw.address) as client,
    ):
        stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
        data = sample_payload(1, 300_000)
        never = asyncio.Event()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Upload(
                _stalling_stream(1, data, 64 * 1024, 128 * 1024, never, []), metadata=client._metadata, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no message" in err.value.details()
        assert gw.budget.used == 0


async def test_server_rss_stays_under_its_bound_with_many_large_streams(tmp_path):
    """32 streams each push 7 of an 8 MiB sample and wait: 224 MiB would be held without the budget."""
    budget, sample_mib, streams, chunk = 32 * MiB, 8, 32, 256 * 1024
    # the budget, one first chunk per open stream, one sample being joined and one verified, 24 MiB of slack;
    # the clients offer 32 x 7 MiB = 224 MiB, so an unbounded gateway would grow far beyond it
    bound = budget + streams * chunk + 2 * sample_mib * MiB + 24 * MiB
    settings = {
        "max_sample_bytes": sample_mib * MiB,
        "max_buffered_bytes": budget,
        "buffer_wait_s": 1.0,
        "chunk_size": chunk,
    }
    with gateway_process(tmp_path / "cloud", "--role", "gateway", settings=settings) as (proc, address):
        client = GatewayClient(
            __import__("transport_support").device_config(tmp_path / "d", address, max_message_bytes=4 * MiB)
        )
        await client.register()
        stub = gateway_pb2_grpc.DeviceGatewayStub(client.channel)
        data = sample_payload(0, sample_mib * MiB - 8192)
        warm = await stub.Upload(
            _stalling_stream(1, data, chunk, len(data), asyncio.Event(), []), metadata=client._metadata
        )
        assert warm.acked_seq == 1
        base = _vm(proc.pid, "VmHWM")
        release = asyncio.Event()
        sent = [[] for _ in range(streams)]
        calls = [
            asyncio.ensure_future(
                stub.Upload(
                    _stalling_stream(2 + i, data, chunk, 7 * MiB, release, sent[i]),
                    metadata=client._metadata,
                    timeout=60,
                )
            )
            for i in range(streams)
        ]
        await asyncio.sleep(3.0)  # every stream has pushed what it will push, or was refused
        peak_loaded = _vm(proc.pid, "VmHWM") - base
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        # RESOURCE_EXHAUSTED, or grpc-aio's client-side INTERNAL when the answer raced a write (retry.py)
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or is_local_send_failure(r) for r in refused)
        assert refused and len(refused) < streams  # some were held within the budget, the others told to retry
        after = _vm(proc.pid, "VmRSS")
        peak = _vm(proc.pid, "VmHWM") - base
        await client.close()
        assert proc.poll() is None
    print(
        f"{streams - len(refused)} admitted, {len(refused)} refused; rss growth while loaded "
        f"{peak_loaded / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, after {(after - base) / MiB:.0f} MiB, "
        f"bound {bound / MiB:.0f} MiB"
    )
    assert peak <= bound, f"server RSS grew {peak / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
    assert after - base <= bound
