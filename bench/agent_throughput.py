"""Throughput with 8 concurrent clients: micro-batched (max_batch 8) against one request per forward.

``python -m bench.agent_throughput [--quick] [--clients 8] [--seconds S]``. Each client sends Ask over the local
gRPC API back to back; both settings run in this process on the same model and images, both agents up at once
and their bursts interleaved (A B, B A, ...) so load drift hits both alike. Target: >= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench._agent_common import QUESTIONS, ask, image_size, model_dir, ms, offline_agent, pct, png, stub_for
from bench._verdict import verdict
from device.agent.service import AgentService


async def _burst(agent, stub, images: list[bytes], clients: int, seconds: float, row: dict) -> None:
    """``clients`` concurrent askers for ``seconds`` on one agent; adds answers, wall, batches, latencies to row."""
    batches0 = agent.batcher.batches
    deadline = time.perf_counter() + seconds

    async def client(c: int) -> int:
        done = 0
        while time.perf_counter() < deadline:
            t, _ = await ask(stub, images[(c * 7 + done) % 32], QUESTIONS[(c + done) % 4])
            row["latencies"].append(t)
            done += 1
        return done

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(client(c) for c in range(clients)))
    row["wall"] += time.perf_counter() - t0
    row["answers"] += sum(counts)
    row["batches"] += agent.batcher.batches - batches0


async def measure(directory: Path, clients: int, seconds: float, settings: dict[str, int], rounds: int) -> dict:
    """Both agents up at once; ``rounds`` bursts each, alternating which goes first (A B, B A, ...)."""
    rows = {name: {"answers": 0, "wall": 0.0, "batches": 0, "latencies": []} for name in settings}
    with contextlib.ExitStack() as dirs:
        async with contextlib.AsyncExitStack() as stack:
            size = image_size(directory)
            images = [png(i, size) for i in range(32)]
            agents, stubs = {}, {}
            for name, max_batch in settings.items():
                state = Path(dirs.enter_context(tempfile.TemporaryDirectory()))
                agent = offline_agent(directory, state, **{"api.max_batch": max_batch, "api.max_wait_ms": 5.0})
                service = AgentService(agent)
                await service.start()
                stack.push_async_callback(service.stop)
                channel = await stack.enter_async_context(grpc.aio.insecure_channel(service.address))
                agents[name], stubs[name] = agent, stub_for(channel)
                for i in range(4):  # warm-up
                    await ask(stubs[name], images[i], QUESTIONS[i % 4])
            for r in range(rounds):
                for name in list(settings) if r % 2 == 0 else list(settings)[::-1]:
                    await _burst(agents[name], stubs[name], images, clients, seconds / rounds, rows[name])
    return {
        name: {"rate": row["answers"] / row["wall"], "answers": row["answers"], "batches": row["batches"],
               "p50": pct(row["latencies"], 50)}
        for name, row in rows.items()
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 s per setting instead of 30 s")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved bursts per setting")
    parser.add_argument("--recipe", default="base", help="model geometry when the reference zoo is absent")
    args = parser.parse_args(argv)
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    directory, label = model_dir(args.recipe)
    print(f"throughput with {args.clients} concurrent clients, {seconds:g} s per setting in {args.rounds} "
          f"interleaved bursts, model: {label}")  # fmt: skip
    settings = {"one by one (max_batch 1)": 1, f"micro-batched (max_batch {args.clients})": args.clients}
    rows = asyncio.run(measure(directory, args.clients, seconds, settings, args.rounds))
    for name, r in rows.items():
        print(
            f"{name:34} {r['rate']:8.1f} answers/s  mean batch {r['answers'] / max(1, r['batches']):5.2f}"
            f"  p50 latency {ms(r['p50'])}"
        )
    one, batched = rows.values()
    ratio = batched["rate"] / one["rate"]
    print(f"micro-batched / one by one: {ratio:.2f}x answers/s (target >= 2x)")
    return verdict("agent_throughput", [(ratio >= 2.0, f"micro-batched {ratio:.2f}x one by one (target >= 2)")])


if __name__ == "__main__":
    sys.exit(main())
