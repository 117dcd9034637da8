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

from bench._verdict import verdict
from bench.transport_common import REPO_ROOT, gateway_process, print_table, sample_payload
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


GRPC_SINK = """
import asyncio, sys
import grpc
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc

class Sink(gateway_pb2_grpc.DeviceGatewayServicer):
    async def Upload(self, it, ctx):
        seq = 0
        async for chunk in it:
            seq = chunk.seq
        return gateway_pb2.UploadResponse(acked_seq=seq)

async def main():
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
    gateway_pb2_grpc.add_DeviceGatewayServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def _grpc_stream(port: int, samples: list[bytes], batch: int) -> float:
    import grpc

    from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc

    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
        start = time.perf_counter()
        for i in range(0, len(samples), batch):
            msgs = (gateway_pb2.SampleChunk(seq=j + 1, data=samples[j]) for j in range(i, min(i + batch, len(samples))))
            await stub.Upload(msgs)
        return time.perf_counter() - start


def bare_grpc_stream(samples: list[bytes], batch: int) -> float:
    """Seconds to stream the samples to a gRPC sink that does nothing with them (the gRPC-only ceiling)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    sink = subprocess.Popen([sys.executable, "-c", GRPC_SINK], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        return asyncio.run(_grpc_stream(port, samples, batch))
    finally:
        sink.terminate()
        sink.wait(10)


def durable_file_write(samples: list[bytes], directory: Path, batch: int) -> float:
    """Seconds to append the samples to a file with an fsync every ``batch`` samples (the disk's bound)."""
    start = time.perf_counter()
    with open(directory / "disk-reference.bin", "wb") as fh:
        for i, s in enumerate(samples, 1):
            fh.write(s)
            if i % batch == 0 or i == len(samples):
                fh.flush()
                os.fsync(fh.fileno())
    return time.perf_counter() - start


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


def main(argv: list[str] | None = None) -> int:
    """Run both paths and print MiB/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    parser.add_argument("--batch", type=int, default=16, help="samples per Upload call")
    parser.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="gateway durability: FULL fsyncs before acking (default), NORMAL survives process crashes only",
    )
    args = parser.parse_args(argv)
    n = 64 if args.quick else 512
    samples = [sample_payload(i, MiB) for i in range(n)]  # real samples: the gateway verifies what it stores
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = raw_tcp_copy(samples)
        bare = bare_grpc_stream(samples, args.batch)
        disk = durable_file_write(samples, Path(tmp), args.batch)
        settings = {"sqlite_synchronous": args.synchronous}
        with gateway_process(Path(tmp) / "cloud", settings=settings) as (_, address):
            direct = asyncio.run(gateway_upload(address, Path(tmp) / "d1", samples, args.batch, False, "bench-1"))
            outbox = asyncio.run(gateway_upload(address, Path(tmp) / "d2", samples, args.batch, True, "bench-2"))
    for name, secs in (
        ("raw loopback TCP copy (baseline)", base),
        ("bare gRPC stream, sink discards (reference)", bare),
        ("append + fsync to a file, no network (disk reference)", disk),
        ("gateway Upload: verified, durable, acked", direct),
        ("outbox -> uplink -> gateway, acked", outbox),
    ):
        rows.append([name, f"{n}", f"{secs:.2f}", f"{n / secs:.0f}", f"{base / secs:.2f}"])
    print_table(
        f"Upload throughput, {n} x 1 MiB samples, batch {args.batch}, synchronous={args.synchronous}",
        ["path", "MiB", "seconds", "MiB/s", "ratio vs raw"],
        rows,
    )
    ratio = base / direct
    print(f"gateway/raw ratio = {ratio:.2f} (target >= 0.50)")
    return verdict(
        "transport_throughput", [(ratio >= 0.5, f"gateway {ratio:.2f}x the raw loopback copy (target >= 0.50)")]
    )


if __name__ == "__main__":
    sys.exit(main())
