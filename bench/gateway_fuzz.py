"""Fuzz the gateway's Upload with raw frames: hostile safetensors headers, bad content, bad declarations, bad
chunking and corrupt protobuf frames, against a gateway subprocess. Target: 0 UNKNOWN, 0 INTERNAL, 0 crashes,
RSS within its bound, no traceback in the log.

``python -m bench.gateway_fuzz [--messages 100000] [--concurrency 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench._verdict import verdict
from bench.transport_common import gateway_process, print_table, sample_payload

MiB = 1024 * 1024
CHUNK = 64 * 1024
SETTINGS = {
    "chunk_size": CHUNK,
    "max_message_bytes": MiB,
    "max_sample_bytes": 4 * MiB,
    "max_buffered_bytes": 64 * MiB,
    "buffer_wait_s": 1.0,
    "sqlite_synchronous": "NORMAL",
}
SLACK = 32 * MiB


def rss_bound(concurrency: int) -> int:
    """Budget + one first chunk per stream + one sample joined and one verified + allocator/gRPC slack."""
    return SETTINGS["max_buffered_bytes"] + concurrency * CHUNK + 2 * SETTINGS["max_sample_bytes"] + SLACK


JSON_VALUES = [None, True, -1, 0, 2**63, 2**70, 1.5, "", "x", "F32", [], [-1], [1, "2"], {}, {"a": 1}, [[1]]]


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _frame(header: object, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def mutate_header(rng: random.Random, payload: bytes) -> bytes:
    """A sample whose safetensors header was changed in one hostile way."""
    header, body = _split(payload)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(9)
    if kind == 0:
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 1:
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JSON_VALUES)
    elif kind == 2:
        header[name]["shape"] = [rng.randint(-(2**40), 2**40) for _ in range(rng.randrange(4))]
    elif kind == 3:
        header[name]["dtype"] = rng.choice(["F128", "I8", "F16", "BOOL", "U64", "F4", "", "i8"])
    elif kind == 4:
        header["__metadata__"] = rng.choice(JSON_VALUES)
    elif kind == 5:
        meta = header.get("__metadata__", {})
        meta[rng.choice(["format", "num_patches", "uncertainty", "question"])] = rng.choice(
            ["", "1e999", "-3", "[]", '{"a": "nan"}', "tandem.uts.sample/0", "9" * 5000, "{}" * 3]
        )
        header["__metadata__"] = meta
    elif kind == 6:
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end + rng.choice([-2, -1, 1, 8])]
    elif kind == 7:  # deep nesting
        depth = rng.choice([100, 10_000, 100_000])
        raw = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        return struct.pack("<Q", len(raw)) + raw + body
    else:
        header[f"extra{rng.randrange(9)}"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    return _frame(header, body)


def _info(data: bytes, fmt: str = "safetensors"):
    from protocol.tandem.v1 import tensors_pb2

    return tensors_pb2.PayloadInfo(format=fmt, size=len(data), sha256=hashlib.sha256(data).digest())


def _chunks(seq: int, data: bytes, info=None, metadata=None) -> list:
    from protocol.tandem.v1 import gateway_pb2

    out = []
    for off in range(0, max(len(data), 1), CHUNK):
        msg = gateway_pb2.SampleChunk(seq=seq, offset=off, data=data[off : off + CHUNK])
        if off == 0:
            msg.payload.CopyFrom(info if info is not None else _info(data))
            msg.metadata.update(metadata or {})
        out.append(msg)
    return out


def fuzz_frames(rng: random.Random, seq: int, base: bytes) -> tuple[str, list[bytes]]:
    """One fuzzed Upload stream as serialized frames, and the name of its mutation."""
    kind = rng.choice(["header", "header", "content", "declaration", "chunking", "corrupt", "metadata", "valid"])
    if kind == "header":
        msgs = _chunks(seq, mutate_header(rng, base))
    elif kind == "content":
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        msgs = _chunks(seq, bytes(data))
    elif kind == "declaration":
        info = _info(base, rng.choice(["safetensors", "opaque", "", "x" * 50]))
        choice = rng.randrange(3)
        if choice == 0:
            info.size = rng.choice([0, len(base) - 1, len(base) + 1, 2**40])
        elif choice == 1:
            info.sha256 = rng.randbytes(rng.choice([0, 31, 32, 33]))
        else:
            info.tensors.add(name="q", dtype=rng.choice(["I8", "F32"]), shape=[rng.randrange(5)])
        msgs = _chunks(seq, base, info)
    elif kind == "chunking":
        msgs = _chunks(seq, base)
        m = rng.choice(msgs)
        setattr(m, rng.choice(["seq", "offset"]), rng.choice([0, 1, seq + 1, 2**63, 2**64 - 1]))
        if rng.random() < 0.3:
            msgs = msgs[:-1]
    elif kind == "metadata":
        meta = {rng.choice(["", "k", "x" * 200]): rng.choice(["v", "v" * 5000])}
        meta.update({str(i): "" for i in range(rng.choice([0, 70]))})
        msgs = _chunks(seq, base, metadata=meta)
    elif kind == "corrupt":
        frames = [m.SerializeToString() for m in _chunks(seq, base)]
        i = rng.randrange(len(frames))
        f = bytearray(frames[i])
        if rng.random() < 0.5:
            f = f[: rng.randrange(1, len(f))]
        else:
            for _ in range(rng.randint(1, 6)):
                f[rng.randrange(len(f))] = rng.randrange(256)
        frames[i] = bytes(f) if rng.random() < 0.8 else rng.randbytes(rng.randrange(1, 64))
        return kind, frames
    else:
        msgs = _chunks(seq, base)
    return kind, [m.SerializeToString() for m in msgs]


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


async def _fuzz(address: str, state: Path, pid: int, messages: int, concurrency: int, seed: int) -> dict:
    import grpc

    from device.transport.client import GatewayClient
    from device.transport.config import DeviceClientConfig
    from device.transport.retry import is_local_send_failure

    bases = [sample_payload(i, size) for i, size in enumerate((600, 5_000, 150_000, 300_000))]
    clients = []
    for w in range(concurrency):
        c = GatewayClient(DeviceClientConfig(gateway=address, state_dir=state / f"f{w}", device_id=f"fuzz-{w}"))
        await c.register()
        clients.append(c)
    codes: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    sent = 0
    calls = 0
    rss_peak = 0
    for w, client in enumerate(clients):  # warm-up: every code path once, so the baseline holds its imports
        await client.upload([_item(i + 1, b) for i, b in enumerate(bases)])
        rng = random.Random(-1 - w)
        for _ in range(20):
            frames = fuzz_frames(rng, 100, rng.choice(bases))[1]
            with contextlib.suppress(grpc.aio.AioRpcError):
                await client.channel.stream_unary("/tandem.v1.DeviceGateway/Upload")(
                    iter(frames), metadata=client._metadata, timeout=30
                )
    base_hwm = _vm(pid, "VmHWM")
    base_rss = _vm(pid, "VmRSS")

    async def worker(w: int) -> None:
        nonlocal sent, calls, rss_peak
        rng = random.Random(seed * 1000 + w)
        client = clients[w]
        upload = client.channel.stream_unary(
            "/tandem.v1.DeviceGateway/Upload", request_serializer=None, response_deserializer=None
        )
        seq = 1000
        while sent < messages:
            kind, frames = fuzz_frames(rng, seq, rng.choice(bases))
            seq += 1
            sent += len(frames)
            calls += 1
            try:
                await upload(iter(frames), metadata=client._metadata, timeout=30)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = "client write race" if is_local_send_failure(err) else err.code().name
            codes[code] += 1
            by_kind[(kind, code)] += 1
            if calls % 500 == 0:
                rss_peak = max(rss_peak, _vm(pid, "VmRSS"))

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    seconds = time.perf_counter() - started
    ok = await clients[0].upload([_item(10**12, bases[0])])
    hb = await clients[1].heartbeat("ok", "v0", {}, 0)
    for c in clients:
        await c.close()
    return {
        "codes": codes,
        "by_kind": by_kind,
        "sent": sent,
        "calls": calls,
        "seconds": seconds,
        "serving": ok.acked_seq == 10**12 and hb.server_unix_ms > 0,
        "hwm_growth": _vm(pid, "VmHWM") - base_hwm,
        "rss_peak": rss_peak,
        "rss_base": base_rss,
        "rss_after": _vm(pid, "VmRSS"),
    }


def _item(seq: int, payload: bytes):
    from device.transport.outbox import OutboxItem

    return OutboxItem(seq, payload, {}, 0)


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer and print the status table; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=None, help="Upload messages to send in all (100000)")
    parser.add_argument("--quick", action="store_true", help="5000 messages unless --messages says otherwise")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent fuzzing devices")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--keep-log", type=Path, default=None, help="copy the gateway's log here")
    parser.add_argument("--budget-mib", type=int, default=64, help="the gateway's max_buffered_bytes in MiB")
    args = parser.parse_args(argv)
    args.messages = args.messages or (5_000 if args.quick else 100_000)
    SETTINGS["max_buffered_bytes"] = args.budget_mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "gateway.log"
        with gateway_process(Path(tmp) / "cloud", settings=SETTINGS, stderr_path=log) as (proc, address):
            result = asyncio.run(
                _fuzz(address, Path(tmp) / "dev", proc.pid, args.messages, args.concurrency, args.seed)
            )
            alive = proc.poll() is None
        log_text = log.read_text()
    if args.keep_log is not None:
        args.keep_log.write_text(log_text)
    codes = result["codes"]
    rows = [[code, str(n)] for code, n in sorted(codes.items(), key=lambda kv: -kv[1])]
    print_table(
        f"Gateway fuzz: {result['sent']} messages in {result['calls']} Upload calls, "
        f"{result['seconds']:.0f} s, {args.concurrency} devices",
        ["status", "calls"],
        rows,
    )
    kinds = sorted({k for k, _ in result["by_kind"]})
    print_table(
        "Status by mutation",
        ["mutation", *sorted(codes)],
        [[k, *(str(result["by_kind"][(k, c)]) for c in sorted(codes))] for k in kinds],
    )
    tracebacks = log_text.count("Traceback")
    unknown, internal = codes.get("UNKNOWN", 0), codes.get("INTERNAL", 0)
    print(
        f"messages = {result['sent']} (target >= {args.messages}); UNKNOWN = {unknown}, INTERNAL = {internal} "
        f"(target 0); gateway crashed = {not alive} (target no); still serving = {result['serving']}"
    )
    bound = rss_bound(args.concurrency)
    print(
        f"server RSS: {result['rss_base'] / MiB:.0f} MiB after registering, sampled peak "
        f"{result['rss_peak'] / MiB:.0f} MiB, {result['rss_after'] / MiB:.0f} MiB at the end; high-water growth "
        f"{result['hwm_growth'] / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB = budget + a first chunk per stream "
        f"+ 2 samples + {SLACK // MiB} MiB); log {len(log_text)} bytes, {tracebacks} tracebacks"
    )
    kinds_of_lines = Counter(line.split(" ", 3)[-1][:100] for line in log_text.splitlines() if line.strip())
    for line, n in kinds_of_lines.most_common(3):
        print(f"  log x{n}: {line}")
    print(
        "targets here are absolute by nature: counts that must be 0, and a memory bound derived from the "
        "gateway's configured budget (there is no baseline gateway that a ratio could compare against)"
    )
    growth = result["hwm_growth"] / bound
    return verdict(
        "gateway_fuzz",
        [
            (unknown == 0 and internal == 0, f"UNKNOWN {unknown}, INTERNAL {internal} (target 0)"),
            (alive and result["serving"], f"gateway alive {alive}, still serving {result['serving']}"),
            (growth <= 1.0, f"RSS high-water growth {growth:.2f}x its bound from the configured budget (target <= 1)"),
            (result["sent"] >= args.messages, f"{result['sent']} messages sent (target >= {args.messages})"),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
