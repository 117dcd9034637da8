"""Throughput with 8 concurrent clients: micro-batched (max_batch 8) against one request per forward.

``python -m bench.agent_throughput [--quick] [--clients 8] [--seconds S]``. Each client sends Ask over the local
gRPC API back to back; both settings run in this process on the same model and images. Target: >= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc

from bench._agent_common import QUESTIONS, ask, image_size, model_dir, ms, offline_agent, pct, png, stub_for
from device.agent.service import AgentService


async def measure(directory: Path, clients: int, seconds: float, max_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as state:
        agent = offline_agent(directory, Path(state), **{"api.max_batch": max_batch, "api.max_wait_ms": 5.0})
        service = AgentService(agent)
        await service.start()
        size = image_size(directory)
        images = [png(i, size) for i in range(32)]
        latencies: list[float] = []
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = stub_for(channel)
                for i in range(4):  # warm-up
                    await ask(stub, images[i], QUESTIONS[i % 4])
                batches0 = agent.batcher.batches
                deadline = time.perf_counter() + seconds

                async def client(c: int) -> int:
                    done = 0
                    while time.perf_counter() < deadline:
                        t, _ = await ask(stub, images[(c * 7 + done) % 32], QUESTIONS[(c + done) % 4])
                        latencies.append(t)
                        done += 1
                    return done

                t0 = time.perf_counter()
                counts = await asyncio.gather(*(client(c) for c in range(clients)))
                wall = time.perf_counter() - t0
                batches = agent.batcher.batches - batches0
        finally:
            await service.stop()
    total = sum(counts)
    return {"rate": total / wall, "answers": total, "batches": batches, "p50": pct(latencies, 50)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 s per setting instead of 30 s")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--recipe", default="base", help="model geometry when the reference zoo is absent")
    args = parser.parse_args(argv)
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    directory, label = model_dir(args.recipe)
    print(f"throughput with {args.clients} concurrent clients, {seconds:g} s per setting, model: {label}")
    rows = {}
    for name, max_batch in (
        ("one by one (max_batch 1)", 1),
        (f"micro-batched (max_batch {args.clients})", args.clients),
    ):
        r = rows[name] = asyncio.run(measure(directory, args.clients, seconds, max_batch))
        print(
            f"{name:34} {r['rate']:8.1f} answers/s  mean batch {r['answers'] / max(1, r['batches']):5.2f}"
            f"  p50 latency {ms(r['p50'])}"
        )
    one, batched = rows.values()
    print(f"micro-batched / one by one: {batched['rate'] / one['rate']:.2f}x answers/s (target >= 2x)")


if __name__ == "__main__":
    main()
