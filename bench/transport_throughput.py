"""Upload throughput of 1 MiB samples through the gateway vs a raw loopback TCP copy (same run).

``python -m bench.transport_throughput [--quick]``. Both paths send the same bytes from this process to
another process over loopback; the gateway path also chunks, digests, verifies, stores durably (SQLite WAL,
synchronous=FULL) and acks. Target: gateway >= 50% of the raw copy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.transport_common import gateway_subprocess, print_table
from common.codec import sha256_digest
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.outbox import Outbox, OutboxItem
from device.transport.uplink import UplinkWorker

MiB = 1024 * 1024
SINK = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
total = int(sys.argv[1])
buf = bytearray(4 * 1024 * 1024)
view = memoryview(buf)
got = 0
while got < total:
    n = conn.recv_into(view)
    if not n:
        break
    got += n
conn.sendall(b"k")
"""


def raw_tcp_copy(samples: list[bytes]) -> float:
    """Seconds to push every sample through a loopback socket to a sink process that acks the end."""
    total = sum(len(s) for s in samples)
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(total)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            start = time.perf_counter()
            for s in samples:
                sock.sendall(s)
            assert sock.recv(1) == b"k"
            return time.perf_counter() - start
    finally:
        sink.wait(30)


async def gateway_upload(
    address: str, state: Path, samples: list[bytes], batch: int, via_outbox: bool, device_id: str
) -> float:
    """Seconds to upload and get every sample acked (directly, or from the durable outbox)."""
    cfg = DeviceClientConfig(
        gateway=address,
        state_dir=state,
        device_id=device_id,
        batch_max_samples=batch,
        batch_max_bytes=batch * (MiB + 1024),
    )
    async with GatewayClient(cfg) as client:
        await client.register()
        if via_outbox:
            box = Outbox(state / "outbox.db")
            for s in samples:
                box.put(s, {"kind": "bench"})
            start = time.perf_counter()
            await UplinkWorker(client, box, cfg).push_all()
            elapsed = time.perf_counter() - start
            assert box.stats().pending == 0
            box.close()
            return elapsed
        items = [OutboxItem(i + 1, s, {"kind": "bench"}, 0, sha256_digest(s)) for i, s in enumerate(samples)]
        start = time.perf_counter()
        for i in range(0, len(items), batch):
            resp = await client.upload(items[i : i + batch])
            assert resp.acked_seq == items[min(i + batch, len(items)) - 1].seq
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Run both paths and print MiB/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    parser.add_argument("--batch", type=int, default=16, help="samples per Upload call")
    args = parser.parse_args(argv)
    n = 64 if args.quick else 512
    samples = [os.urandom(MiB) for _ in range(n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = raw_tcp_copy(samples)
        with gateway_subprocess(Path(tmp) / "cloud") as address:
            direct = asyncio.run(
                gateway_upload(address, Path(tmp) / "d1", samples, args.batch, False, "bench-1")
            )
            outbox = asyncio.run(
                gateway_upload(address, Path(tmp) / "d2", samples, args.batch, True, "bench-2")
            )
    for name, secs in (
        ("raw loopback TCP copy (baseline)", base),
        ("gateway Upload, acked + durable", direct),
        ("outbox -> uplink -> gateway, acked", outbox),
    ):
        rows.append([name, f"{n}", f"{secs:.2f}", f"{n / secs:.0f}", f"{base / secs:.2f}"])
    print_table(
        f"Upload throughput, {n} x 1 MiB samples, batch {args.batch}",
        ["path", "MiB", "seconds", "MiB/s", "ratio vs raw"],
        rows,
    )
    print(f"gateway/raw ratio = {base / direct:.2f} (target >= 0.50)")


if __name__ == "__main__":
    main()
