"""Swap pause: the largest request-latency spike while an update is applied and swapped in, against the request
time measured in the same run.

``python -m bench.agent_swap [--quick]``: 4 clients ask back to back; mid-run a DWC update (built with the cloud's
compressor against the device's exact adapter) goes through the agent's own apply path (apply off the request path,
store commit, swap between batches). Target: the spike is no more than one request time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from bench._agent_common import QUESTIONS, ask, image_size, model_dir, ms, offline_agent, pct, png, stub_for
from bench._verdict import verdict
from cloud.dwc import CloudMirror, DWCConfig, compress
from device.agent.service import AgentService
from protocol.tandem.v1 import gateway_pb2, tensors_pb2
from protocol.updates import header_to_proto


def _header(update) -> gateway_pb2.UpdateHeader:
    info = tensors_pb2.PayloadInfo(size=update.header.size, sha256=bytes.fromhex(update.header.sha256_hex))
    return header_to_proto(
        update.header.addressed("bench"), update_id=1, payload=info, signature=b"", key_id="", created_unix_ms=0
    )


async def measure(directory: Path, seconds: float, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as state:
        agent = offline_agent(directory, Path(state), **{"guard.enabled": False})
        service = AgentService(agent)
        await service.start()
        size = image_size(directory)
        images = [png(i, size) for i in range(32)]
        mirror = CloudMirror(agent.model.adapter.state)
        target = {k: v + 0.02 * torch.randn_like(v) for k, v in mirror.state.items()}
        update = compress(mirror, target, DWCConfig(bits=8))
        samples: list[tuple[float, float]] = []  # (start, end) of every request
        window: dict[str, float] = {}
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = stub_for(channel)
                for i in range(8):
                    await ask(stub, images[i], QUESTIONS[i % 4])
                deadline = time.perf_counter() + seconds

                async def client(c: int) -> None:
                    i = 0
                    while time.perf_counter() < deadline:
                        t0 = time.perf_counter()
                        await ask(stub, images[(c * 5 + i) % 32], QUESTIONS[i % 4])
                        samples.append((t0, time.perf_counter()))
                        i += 1

                async def swapper() -> None:
                    await asyncio.sleep(seconds / 2)
                    window["start"] = time.perf_counter()
                    await agent._apply_update(update.payload, _header(update))
                    window["end"] = time.perf_counter()

                await asyncio.gather(swapper(), *(client(c) for c in range(clients)))
                pause = agent.batcher.swap_pauses_s[-1]
        finally:
            await service.stop()
    durations = [e - s for s, e in samples]
    during = [e - s for s, e in samples if s <= window["end"] and e >= window["start"]]
    before = [e - s for s, e in samples if e < window["start"]]
    return {
        "p50": pct(before, 50),
        "max_before": max(before),
        "max_during": max(during),
        "apply_s": window["end"] - window["start"],
        "pause_s": pause,
        "n": len(durations),
        "version": agent.step.version,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 s instead of 20 s")
    parser.add_argument("--recipe", default="base", help="model geometry when the reference zoo is absent")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    directory, label = model_dir(args.recipe)
    r = asyncio.run(measure(directory, 6.0 if args.quick else 20.0, args.clients))
    spike = r["max_during"] - r["p50"]
    print(f"swap pause with {args.clients} clients, {r['n']} requests, model: {label}; now serving {r['version']}")
    print(f"request time p50 before the update   {ms(r['p50'])} (largest before: {ms(r['max_before'])})")
    print(f"largest request during apply + swap  {ms(r['max_during'])}")
    print(f"apply + commit + swap (off the path) {ms(r['apply_s'])}; worker paused for the swap {ms(r['pause_s'])}")
    print(f"spike over p50 / request time: {spike / r['p50']:.2f} (target <= 1.0)")
    ratio = spike / r["p50"]
    return verdict(
        "agent_swap", [(ratio <= 1.0, f"swap spike {ratio:.2f} request times of the same run (target <= 1.0)")]
    )


if __name__ == "__main__":
    sys.exit(main())
