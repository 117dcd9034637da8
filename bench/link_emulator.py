"""Link emulator accuracy: achieved rate vs configured 1, 10 and 100 Mbit/s, and added latency.

``python -m bench.link_emulator [--quick]``. Bytes go from a sender through the LinkProxy to a sink that
reports when the last byte arrived; the unshaped proxy's rate is measured in the same run as the headroom
baseline. Target: achieved rate within +-5% of the configured rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench._verdict import verdict
from bench.transport_common import print_table
from sim.link import LinkConfig, LinkProxy


async def _sink_server(done: dict[str, float]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
            done["last"] = time.perf_counter()
        done["bytes"] = total
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def measure_rate(config: LinkConfig, seconds: float) -> float:
    """Achieved bytes/s through a proxy with ``config`` for a transfer sized to last about ``seconds``."""
    done: dict[str, float] = {}
    server, port = await _sink_server(done)
    rate = LinkConfig.mbps_to_bytes_per_s(config.up_mbps) or 200e6
    total = int(rate * seconds)
    async with LinkProxy("127.0.0.1", port, config) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        block = b"\x5a" * 65536
        start = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            writer.write(block[:n])
            await writer.drain()
            sent += n
        writer.write_eof()
        while "bytes" not in done:
            await asyncio.sleep(0.005)
        writer.close()
    server.close()
    return done["bytes"] / (done["last"] - start)


async def measure_rtt(config: LinkConfig, rounds: int = 20) -> float:
    """Median round trip of 100-byte pings through the proxy to an echo server, in seconds."""

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rtts = []
    async with LinkProxy("127.0.0.1", port, config) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for _ in range(rounds):
            start = time.perf_counter()
            writer.write(b"p" * 100)
            await writer.drain()
            await reader.readexactly(100)
            rtts.append(time.perf_counter() - start)
        writer.close()
    server.close()
    return sorted(rtts)[len(rtts) // 2]


async def run(seconds: float) -> float:
    """Measure and print."""
    rows = []
    unshaped = await measure_rate(LinkConfig(), seconds)
    rows.append(["unshaped proxy (baseline)", "-", f"{unshaped * 8 / 1e6:.1f}", "-", "-"])
    worst = 0.0
    for mbps in (1, 10, 100):
        achieved = await measure_rate(LinkConfig(up_mbps=mbps), seconds)
        ratio = achieved * 8 / 1e6 / mbps
        worst = max(worst, abs(ratio - 1))
        rows.append(
            [
                f"up_mbps={mbps}",
                f"{mbps}",
                f"{achieved * 8 / 1e6:.3f}",
                f"{ratio:.3f}",
                "yes" if abs(ratio - 1) <= 0.05 else "NO",
            ]
        )
    print_table("Link emulator rate", ["link", "configured Mbit/s", "achieved Mbit/s", "ratio", "within 5%"], rows)
    base_rtt = await measure_rtt(LinkConfig())
    rtt = await measure_rtt(LinkConfig(latency_ms=50))
    print_table(
        "Link emulator latency (median RTT of 100-byte pings)",
        ["link", "RTT ms", "added ms (expected 100)"],
        [
            ["latency_ms=0 (baseline)", f"{base_rtt * 1000:.2f}", "-"],
            ["latency_ms=50", f"{rtt * 1000:.2f}", f"{(rtt - base_rtt) * 1000:.2f}"],
        ],
    )
    print(f"worst rate error = {worst * 100:.2f}% (target <= 5%)")
    return worst


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 s transfers instead of 5 s")
    args = parser.parse_args(argv)
    worst = asyncio.run(run(2.0 if args.quick else 5.0))
    return verdict(
        "link_emulator", [(worst <= 0.05, f"worst achieved/configured rate error {100 * worst:.2f}% (target <= 5%)")]
    )


if __name__ == "__main__":
    sys.exit(main())
