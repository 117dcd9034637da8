"""Agent overhead: Ask through the local gRPC API (batch 1, one client) against a bare forward of the same model.

``python -m bench.agent_overhead [--quick] [--requests N]``. The bare forward is what the agent's model does for
one request (vision tower + projector + language model with SparseVLM, on the same decoded image and question),
called directly; Ask adds gRPC, image decoding, queueing, UTS and the outbox write of chosen samples. The two are
interleaved request by request, so machine load hits both alike. Both wall time and process CPU time (all threads:
agent, gRPC server and client) are reported; on a loaded shared machine the CPU time is the steadier figure, since
every thread hand-off of a request waits for the scheduler. Target: overhead <= 10% at batch 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench._agent_common import QUESTIONS, ask, image_size, model_dir, ms, offline_agent, pct, png, stub_for
from bench._verdict import verdict
from device.agent.service import AgentService
from device.agent.sources import decode_image


async def measure(directory: Path, requests: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as state:
        agent = offline_agent(directory, Path(state))
        service = AgentService(agent)
        await service.start()
        size = image_size(directory)
        images = [png(i, size) for i in range(16)]
        out: dict[str, list[float]] = {"ask": [], "bare": [], "inside": [], "ask_cpu": [], "bare_cpu": []}
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = stub_for(channel)
                model = agent.model
                for i in range(requests + 8):
                    img, q = images[i % len(images)], QUESTIONS[i % len(QUESTIONS)]
                    c0 = time.process_time()
                    t_ask, reply = await ask(stub, img, q)
                    c1 = time.process_time()
                    pixels = decode_image(img, 1 << 24)
                    t0 = time.perf_counter()
                    model.forward(model.features([pixels]), [q])
                    t_bare = time.perf_counter() - t0
                    c2 = time.process_time()
                    if i >= 8:  # warm-up
                        out["ask"].append(t_ask)
                        out["bare"].append(t_bare)
                        out["inside"].append(reply.latency_ms / 1e3)
                        out["ask_cpu"].append(c1 - c0)
                        out["bare_cpu"].append(c2 - c1)
        finally:
            await service.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 requests instead of 300")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--recipe", default="base", help="model geometry when the reference zoo is absent")
    args = parser.parse_args(argv)
    n = args.requests or (60 if args.quick else 300)
    directory, label = model_dir(args.recipe)
    r = asyncio.run(measure(directory, n))
    print(f"agent overhead at batch 1, {n} requests, model: {label}")
    print(f"{'':24}{'p50':>12}{'p99':>12}")
    for name, key in (("bare forward", "bare"), ("Ask (inside the agent)", "inside"), ("Ask (client, gRPC)", "ask")):
        print(f"{name:24}{ms(pct(r[key], 50)):>12}{ms(pct(r[key], 99)):>12}")
    print(f"{'bare forward, CPU time':24}{ms(pct(r['bare_cpu'], 50)):>12}{ms(pct(r['bare_cpu'], 99)):>12}")
    print(f"{'Ask, CPU time':24}{ms(pct(r['ask_cpu'], 50)):>12}{ms(pct(r['ask_cpu'], 99)):>12}")
    p50 = pct(r["ask"], 50) / pct(r["bare"], 50)
    p99 = pct(r["ask"], 99) / pct(r["bare"], 99)
    cpu = sum(r["ask_cpu"]) / sum(r["bare_cpu"])
    print(f"Ask / bare forward, wall: p50 {p50:.3f}x (overhead {100 * (p50 - 1):+.1f}%), p99 {p99:.3f}x")
    print(f"Ask / bare forward, CPU time (total): {cpu:.3f}x (overhead {100 * (cpu - 1):+.1f}%)  (target <= 1.10)")
    load = os.getloadavg()[0]
    print(f"machine load average during the run: {load:.1f} on {os.cpu_count()} cores")
    return verdict(
        "agent_overhead", [(cpu <= 1.10, f"Ask CPU time {cpu:.3f}x the bare forward, interleaved (target <= 1.10)")]
    )


if __name__ == "__main__":
    sys.exit(main())
