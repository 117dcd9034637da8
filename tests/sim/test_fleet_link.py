"""Link presets, CSV traces (parsing and replay through the proxy) and emulated packet loss."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.errors import ConfigError
from sim.link import PRESETS, LinkConfig, LinkProxy, LinkState, LinkTrace, link_config

BASE = LinkState(up_mbps=10.0, down_mbps=None, latency_ms=5.0, jitter_ms=0.0, loss=0.0)


def test_presets():
    assert set(PRESETS) == {"wifi", "lte", "3g", "satellite"}
    sat = link_config("satellite")
    assert sat.latency_ms >= 250 and sat.up_mbps < sat.down_mbps
    assert link_config("3g", loss=0.05).loss == 0.05
    with pytest.raises(ConfigError, match="unknown link preset 'edge'; known: wifi, lte, 3g, satellite"):
        link_config("edge")


def test_trace_parses_and_steps(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("# comment\nt_s,up_mbps,down_mbps,loss\n0,1,inf,0\n10,0.256,,0.02\n20,,2,\n")
    trace = LinkTrace.load(p)
    assert trace.state(0, BASE) == LinkState(1.0, None, 5.0, 0.0, 0.0)
    assert trace.state(15, BASE) == LinkState(0.256, None, 5.0, 0.0, 0.02)  # empty cell: configured value
    assert trace.state(25, BASE) == LinkState(10.0, 2.0, 5.0, 0.0, 0.0)
    looped = LinkTrace.load(p, loop=True)
    assert looped.state(45, BASE) == trace.state(5, BASE)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("up_mbps\n1\n", "must name a t_s column"),
        ("t_s,speed\n0,1\n", "unknown column 'speed'"),
        ("t_s,up_mbps\n0,fast\n", "t.csv:2: up_mbps must be a number, got 'fast'"),
        ("t_s,up_mbps\n0,1\n5,0\n", "t.csv:3: up_mbps must be > 0"),
        ("t_s,loss\n0,1.5\n", "loss must be in [0, 1)"),
        ("t_s,up_mbps\n0,1\n5,1\n5,2\n", "t_s must increase"),
        ("t_s,up_mbps\n3,1\n", "first row must start at t_s 0"),
        ("t_s,up_mbps\n0,1,2\n", "3 cells for 2 columns"),
        ("t_s,up_mbps\n", "has no rows"),
    ],
)
def test_trace_errors(tmp_path, text, needle):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        LinkTrace.load(p)
    assert needle in str(info.value) and "\n" not in str(info.value)


async def _sink_server():
    """Reads everything, then answers with the byte count."""

    async def handle(reader, writer):
        n = 0
        while data := await reader.read(65536):
            n += len(data)
        writer.write(str(n).encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _push(port: int, nbytes: int) -> float:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x" * nbytes)
    await writer.drain()
    writer.write_eof()
    assert int(await reader.read()) == nbytes
    writer.close()
    return time.monotonic() - start


async def test_trace_drives_the_proxy_rate(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("t_s,up_mbps\n0,0.8\n0.3,8\n")  # 100 kB/s, then 1 MB/s after 0.3 s
    server, port = await _sink_server()
    async with LinkProxy("127.0.0.1", port, LinkConfig(trace=p)) as proxy:
        assert proxy.state.up_mbps == 0.8
        slow = await _push(proxy.port, 20_000)  # ~0.2 s at 100 kB/s
        await asyncio.sleep(0.3)
        assert proxy.state.up_mbps == 8.0
        fast = await _push(proxy.port, 20_000)  # ~0.02 s at 1 MB/s
    server.close()
    assert slow >= 0.15 and fast < slow / 2


async def test_loss_delays_pieces_without_dropping_bytes():
    server, port = await _sink_server()
    cfg = LinkConfig(loss=0.2, min_rto_ms=50, read_chunk_bytes=1500, seed=3)
    async with LinkProxy("127.0.0.1", port, cfg) as proxy:
        took = await _push(proxy.port, 30_000)
        assert proxy.stats.retransmits >= 1
        assert proxy.stats.bytes_up == 30_000
    server.close()
    assert took >= 0.05
