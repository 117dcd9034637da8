"""N device jobs at once on a pool of learner actors sharing one teacher actor: throughput for N = 1, 4, 16.

Every job labels its uploads through the same teacher actor (requests queue there) and trains its own learner.
Prints jobs/s and samples/s for each N and the ratio to N = 1, and the summed time jobs spent in label calls
(teacher compute plus queueing at the shared actor) as a share of the wall time.

    python -m bench.cloud_teacher_sharing [--quick] [--zoo DIR] [--samples 60] [--learners 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import ray

from bench._cloud_setup import add_zoo_option, config, spec, uploads, zoo_paths
from bench._verdict import verdict
from cloud.adaptation.ray_executor import RayExecutor


def _batch(executor: RayExecutor, specs) -> tuple[float, float]:
    """Wall seconds for all ``specs`` and the summed teacher labelling seconds."""
    start = time.perf_counter()
    pending, label_s = list(specs), 0.0
    outstanding = 0
    while pending or outstanding:
        while pending and executor.free_slots():
            executor.submit(pending.pop(0))
            outstanding += 1
        for fin in executor.poll(1.0):
            if fin.error is not None:
                raise fin.error
            label_s += float(fin.result.summary.get("label_s", 0.0))
            outstanding -= 1
    return time.perf_counter() - start, label_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1 and 4 only.")
    parser.add_argument("--samples", type=int, default=60, help="Samples per device job.")
    parser.add_argument("--learners", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    add_zoo_option(parser)
    args = parser.parse_args(argv)
    sizes = (1, 4) if args.quick else (1, 4, 16)
    zoo = zoo_paths(args.zoo)
    payloads = uploads(zoo, args.samples)
    rows = []
    with tempfile.TemporaryDirectory() as state:
        share = (args.num_cpus - 0.5) / args.learners
        ray_cfg = {"learners": args.learners, "num_cpus": args.num_cpus, "teacher_num_cpus": 0.5}
        cfg = config(zoo, ray={**ray_cfg, "learner_num_cpus": share})
        executor = RayExecutor(cfg, state)
        try:
            warm = [spec(1000 + i, f"warm-{i}", payloads) for i in range(args.learners)]
            _batch(executor, warm)  # every actor has loaded its models
            next_id = 1
            for n in sizes:
                specs = [spec(next_id + i, f"n{n}-dev-{i}", payloads) for i in range(n)]
                next_id += n
                wall, label_s = _batch(executor, specs)
                rows.append((n, wall, label_s))
        finally:
            executor.close()
            if ray.is_initialized():
                ray.shutdown()
    print(f"zoo {zoo.root.name}, {args.samples} samples per job, {args.learners} learner actors, 1 teacher actor")
    base = args.samples / rows[0][1]
    for n, wall, label_s in rows:
        rate = n * args.samples / wall
        print(
            f"  N={n:<3} {wall:7.2f} s  {n / wall:6.2f} jobs/s  {rate:7.1f} samples/s  "
            f"{rate / base:5.2f}x N=1   in label calls {label_s / wall:4.2f}x wall"
        )
    checks = []
    for n, wall, _ in rows[1:]:
        ratio = n * args.samples / wall / base
        checks.append((ratio >= 1.0, f"N={n} sharing one teacher: {ratio:.2f}x the samples/s of N=1 (target >= 1)"))
    return verdict("cloud_teacher_sharing", checks)


if __name__ == "__main__":
    sys.exit(main())
