"""Ack latency with many concurrent emulated devices against one gateway (same-run single-device baseline).

``python -m bench.transport_latency [--quick] [--devices 200]``. Each device has its own channel and token
and uploads one sample (default 64 KiB) at Poisson-distributed times (mean interval 1 s); latency runs from
the Upload call to its ack (durably stored). Afterwards every acked sample is looked up in the store.
Target: the p99 with 200 devices (20x the arrival rate) at most 5x the p99 of one device at 10/s measured in the
same run (queueing may cost something, not everything), and zero acked samples lost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._verdict import verdict
from bench.transport_common import gateway_process, print_table, sample_payload
from cloud.samples import SqliteSampleStore
from common.codec import sha256_digest
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.outbox import OutboxItem


async def device_loop(
    client: GatewayClient,
    payload: bytes,
    mean_interval_s: float,
    until: float,
    rng: random.Random,
    latencies: list[float],
    acked: list[int],
) -> None:
    """Upload one sample at a time at random intervals until ``until``; record latency and acked seqs."""
    digest = sha256_digest(payload)
    await client.upload([OutboxItem(1, payload, {"bench": "warm-up"}, 0, digest)])  # connection + first-call costs
    acked.append(1)
    seq = 1
    await asyncio.sleep(rng.uniform(0, mean_interval_s))
    while time.monotonic() < until:
        seq += 1
        start = time.perf_counter()
        resp = await client.upload([OutboxItem(seq, payload, {"bench": "latency"}, 0, digest)])
        latencies.append(time.perf_counter() - start)
        if resp.acked_seq != seq:
            raise RuntimeError(f"acked {resp.acked_seq}, expected {seq}")
        acked.append(seq)
        await asyncio.sleep(rng.expovariate(1.0 / mean_interval_s))


async def run_devices(
    address: str, state: Path, n: int, seconds: float, size: int, prefix: str, interval_s: float = 1.0
) -> tuple[list[float], dict[str, list[int]]]:
    """Register ``n`` devices, run them concurrently, return all latencies and acked seqs per device."""
    clients = []
    for i in range(n):
        cfg = DeviceClientConfig(gateway=address, state_dir=state / f"{prefix}{i}", device_id=f"{prefix}{i}")
        client = GatewayClient(cfg)
        await client.register()
        clients.append(client)
    payload = sample_payload(0, size)
    latencies: list[float] = []
    acked: dict[str, list[int]] = {c.identity.device_id: [] for c in clients}
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(
            device_loop(c, payload, interval_s, until, random.Random(i), latencies, acked[c.identity.device_id])
            for i, c in enumerate(clients)
        )
    )
    for c in clients:
        await c.close()
    return latencies, acked


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    """Run the baseline (1 device) and the loaded case (N devices); print p50/p99 and losses."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="8 s loaded phase instead of 30 s")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--size", type=int, default=64 * 1024, help="sample bytes")
    args = parser.parse_args(argv)
    seconds = 8.0 if args.quick else 30.0
    base_seconds = min(seconds, 10.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "cloud"
        # every device may hold an Upload stream at once (their warm-up calls start together)
        settings = {"max_upload_streams": max(128, args.devices + 8)}
        with gateway_process(data_dir, settings=settings) as (_, address):
            base_lat, base_acked = asyncio.run(
                run_devices(address, Path(tmp), 1, base_seconds, args.size, "solo-", 0.1)
            )
            lat, acked = asyncio.run(run_devices(address, Path(tmp), args.devices, seconds, args.size, "dev-"))
        store = SqliteSampleStore(data_dir / "samples.db")
        lost = 0
        for dev, seqs in {**base_acked, **acked}.items():
            stored = {s.seq for s in store.iter_samples(dev)}
            lost += len(set(seqs) - stored)
            if len(stored) != len(seqs):
                lost += abs(len(stored) - len(seqs))
        store.close()
    base_p50, base_p99 = _pct(base_lat, 50), _pct(base_lat, 99)
    p50, p99 = _pct(lat, 50), _pct(lat, 99)
    rows.append(
        [
            "1 device, 10/s (baseline)",
            str(len(base_lat)),
            f"{base_p50 * 1000:.1f}",
            f"{base_p99 * 1000:.1f}",
            "1.00",
        ]
    )
    rows.append(
        [
            f"{args.devices} devices, 1/s each",
            str(len(lat)),
            f"{p50 * 1000:.1f}",
            f"{p99 * 1000:.1f}",
            f"{p99 / base_p99:.2f}",
        ]
    )
    print_table(
        f"Ack latency, {args.size // 1024} KiB samples, Poisson arrivals, {seconds:.0f} s loaded",
        ["case", "acked uploads", "p50 ms", "p99 ms", "p99 ratio vs baseline"],
        rows,
    )
    ratio = p99 / base_p99
    print(
        f"p99 with {args.devices} devices = {p99 * 1000:.1f} ms = {ratio:.2f}x one device's (target <= 5x); "
        f"lost acked samples = {lost} (target 0, a count); max = {max(lat) * 1000:.1f} ms"
    )
    return verdict(
        "transport_latency",
        [
            (ratio <= 5.0, f"p99 with {args.devices} devices {ratio:.2f}x one device's, same run (target <= 5)"),
            (lost == 0, f"{lost} acked samples lost (target 0)"),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
