"""SparseVLM on against off, end to end through the agent (Ask over the local API, batch 1).

``python -m bench.agent_sparse [--quick] [--recipe base576]``: the same agent code with ``sparse.enabled`` off and
with budgets 64 and 192 visual tokens (of 576 at LLaVA-1.5 geometry), interleaved request by request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import grpc

from bench._agent_common import QUESTIONS, ask, image_size, model_dir, ms, offline_agent, pct, png, stub_for
from bench._verdict import verdict
from device.agent.service import AgentService
from device.sparse import SparseConfig


async def measure(directory: Path, requests: int, budgets: list[int]) -> dict[str, dict]:
    settings: dict[str, SparseConfig | None] = {"dense (SparseVLM off)": None}
    settings.update({f"SparseVLM budget {b}": SparseConfig(budget=b) for b in budgets})
    out = {name: {"t": [], "kept": 0, "total": 0} for name in settings}
    with tempfile.TemporaryDirectory() as state:
        agent = offline_agent(directory, Path(state), **{"uts.enabled": False})
        service = AgentService(agent)
        await service.start()
        size = image_size(directory)
        images = [png(i, size) for i in range(16)]
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = stub_for(channel)
                for i in range(requests + 4):
                    for name, cfg in settings.items():
                        agent.batcher.between_batches(lambda c=cfg: agent.model.set_sparse(c)).result(30)
                        t, reply = await ask(stub, images[i % 16], QUESTIONS[i % 4])
                        if i >= 4:
                            out[name]["t"].append(t)
                            out[name]["kept"], out[name]["total"] = reply.visual_tokens_kept, reply.visual_tokens_total
        finally:
            await service.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 requests per setting instead of 100")
    parser.add_argument("--recipe", default="base576", help="model geometry (base576: 576 visual tokens)")
    args = parser.parse_args(argv)
    n = 20 if args.quick else 100
    directory, label = model_dir(args.recipe)
    r = asyncio.run(measure(directory, n, [64, 192]))
    dense = pct(r["dense (SparseVLM off)"]["t"], 50)
    print(f"SparseVLM through the agent, {n} requests per setting, model: {label}")
    for name, row in r.items():
        p50 = pct(row["t"], 50)
        print(
            f"{name:24} visual tokens {row['kept']:4d}/{row['total']:<4d} p50 {ms(p50):>10}"
            f"  p99 {ms(pct(row['t'], 99)):>10}  p50 vs dense {p50 / dense:.3f}x"
        )
    checks = [
        (pct(row["t"], 50) < dense, f"{name}: p50 {pct(row['t'], 50) / dense:.3f}x dense, interleaved (target < 1)")
        for name, row in r.items()
        if name != "dense (SparseVLM off)"
    ]
    return verdict("agent_sparse", checks)


if __name__ == "__main__":
    sys.exit(main())
