"""Link emulator: forwards bytes intact, adds latency, limits rate, cuts and refuses during outages."""

from __future__ import annotations

import asyncio
import time

import pytest

from sim.link import LinkConfig, LinkProxy, TokenBucket
from sim.link.config import Outage


async def _echo_server():
    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    writer.close()
    return got


async def test_forwards_intact_with_latency():
    server, port = await _echo_server()
    async with LinkProxy("127.0.0.1", port, LinkConfig(latency_ms=50, jitter_ms=10)) as proxy:
        payload = bytes(range(256)) * 400
        start = time.monotonic()
        assert await _roundtrip(proxy.port, payload) == payload
        assert time.monotonic() - start >= 0.08  # two one-way delays of 40-60 ms
    server.close()


async def test_bandwidth_limits_throughput():
    server, port = await _echo_server()
    async with LinkProxy("127.0.0.1", port, LinkConfig(up_mbps=8)) as proxy:  # 1 MB/s
        start = time.monotonic()
        await _roundtrip(proxy.port, b"x" * 300_000)
        elapsed = time.monotonic() - start
    assert 0.25 <= elapsed <= 1.5
    server.close()


async def test_cut_and_outage():
    server, port = await _echo_server()
    cfg = LinkConfig(outages=[Outage(start_s=0.0, duration_s=0.3)])
    async with LinkProxy("127.0.0.1", port, cfg) as proxy:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"during outage")
        await asyncio.sleep(0.35)
        assert await _roundtrip(proxy.port, b"after") == b"after"
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        await reader.readexactly(1)
        assert proxy.cut_all() >= 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(b"b")
            await writer.drain()
            await reader.readexactly(1)
        assert proxy.stats.refused >= 1 and proxy.stats.cuts >= 1
    server.close()


async def test_token_bucket_rate():
    bucket = TokenBucket(1_000_000, burst_bytes=10_000)
    start = time.monotonic()
    for _ in range(50):
        await bucket.take(10_000)
    assert 0.4 <= time.monotonic() - start <= 0.8
    with pytest.raises(ValueError):
        TokenBucket(0)


async def test_random_cuts_follow_probability():
    server, port = await _echo_server()
    async with LinkProxy("127.0.0.1", port, LinkConfig(cut_probability_per_s=20.0, seed=7)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            for _ in range(100):  # 5 s at most; a cut is expected within a fraction of a second
                writer.write(b"ping")
                await writer.drain()
                await reader.readexactly(4)
                await asyncio.sleep(0.05)
        assert proxy.stats.cuts >= 1
    server.close()


async def test_scheduled_cut():
    server, port = await _echo_server()
    async with LinkProxy("127.0.0.1", port, LinkConfig(cut_schedule_s=[0.3])) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        await reader.readexactly(1)
        assert proxy.stats.cuts == 0
        await asyncio.sleep(0.5)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(b"b")
            await writer.drain()
            await reader.readexactly(1)
        assert proxy.stats.cuts == 1
    server.close()
