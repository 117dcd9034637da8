"""Zoo answer-training step with the frozen tower cut at LLaVA's feature layer, against the whole tower.

Trains the base recipe's teacher and device models (fresh weights, base geometry) for alternating blocks of
steps with and without the cut, in the same run, and prints each member's median step time and the ratio.
The cut changes no bit of training (``tests/sim/test_tower_cut.py``), only the work per step.

    python -m bench.zoo_step [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench._verdict import verdict
from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.recipe import ZooRecipe
from sim.zoo.tokenizer import build_processor
from sim.zoo.train import train_answers


def step_times(model, world: World, encoder: BatchEncoder, spec, cut: bool, shifted: bool, seed: int) -> list[float]:
    """Seconds per step of one block (the first step, which warms caches, dropped)."""
    stamps: list[float] = []
    train_answers(
        model, world, encoder, spec, shifted=shifted, min_severity=0.4, seed=seed,
        on_step=lambda _step, _loss: stamps.append(time.perf_counter()), cut_tower=cut,
    )  # fmt: skip
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 blocks of 12 steps per mode instead of 4 of 25")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks, steps = (2, 12) if args.quick else (4, 25)
    recipe = ZooRecipe()
    v = recipe.vision
    processor = build_processor(v.image_size, v.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    print(f"base geometry: {v.num_patches} visual tokens, {v.num_layers}-layer tower read at layer -2; "
          f"{args.threads} thread(s); {blocks} blocks x {steps} steps per mode, alternating")  # fmt: skip
    checks = []
    for member, text, stage, shifted in (
        ("teacher", recipe.teacher, recipe.teacher_stage, True),
        ("device", recipe.device, recipe.device_stage, False),
    ):
        model = build_llava(v, text, len(processor.tokenizer), encoder.image_id, encoder.pad_id, recipe.seed)
        spec = stage.model_copy(update={"steps": steps + 1, "warmup": 1})
        times: dict[bool, list[float]] = {True: [], False: []}
        for block in range(blocks):
            for cut in (False, True):
                times[cut] += step_times(model, World(block, v.image_size), encoder, spec, cut, shifted, seed=block)
        whole, cut = statistics.median(times[False]), statistics.median(times[True])
        print(f"{member:<8} step: whole tower {1000 * whole:6.1f} ms   cut tower {1000 * cut:6.1f} ms   "
              f"ratio cut/whole {cut / whole:.2f}")  # fmt: skip
        checks.append(
            (cut < whole, f"{member} step with the cut tower {cut / whole:.2f}x the whole tower (target < 1)")
        )
    return verdict("zoo_step", checks)


if __name__ == "__main__":
    sys.exit(main())
