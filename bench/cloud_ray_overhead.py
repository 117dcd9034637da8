"""One adaptation job of 240 samples through the Ray executor against the in-process executor (target: <= 1.2x).

Both run the same Worker code (restore learner, label with the teacher, AKD, gate, DWC, save state); the Ray path
adds the actors, the object store and the teacher-actor round trip. Both executors are up at once; each runs a
warm-up job (models loaded), then ``--repeats`` jobs of fresh devices, the two sides alternating job by job (A B,
B A, ...) so load drift on a shared machine hits both alike; the figure is the ratio of the medians.

    python -m bench.cloud_ray_overhead [--quick] [--zoo DIR] [--samples 240]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import ray

from bench._cloud_setup import add_zoo_option, config, spec, uploads, zoo_paths
from bench._verdict import verdict
from cloud.adaptation.executor import InProcessExecutor
from cloud.adaptation.ray_executor import RayExecutor


def _job(executor, job) -> float:
    """Seconds for ``job`` on ``executor``, from submit to its result."""
    start = time.perf_counter()
    executor.submit(job)
    done = []
    while not done:
        done = executor.poll(1.0)
    if done[0].error is not None:
        raise done[0].error
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Two timed jobs per side instead of five.")
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=None)
    add_zoo_option(parser)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    zoo = zoo_paths(args.zoo)
    payloads = uploads(zoo, args.samples)
    specs = [spec(i + 1, f"dev-{i}", payloads) for i in range(repeats + 1)]
    results: dict[str, list[float]] = {"in-process": [], "ray": []}
    with tempfile.TemporaryDirectory() as state:
        cfg = config(zoo, ray={"learners": 1, "num_cpus": 2, "teacher_num_cpus": 0.5, "learner_num_cpus": 0.5})
        executors = {
            "in-process": InProcessExecutor(cfg, f"{state}/inprocess"),
            "ray": RayExecutor(cfg, f"{state}/ray"),
        }
        try:
            for executor in executors.values():
                _job(executor, specs[0])  # warm-up: models loaded
            for i, job in enumerate(specs[1:]):
                order = list(executors) if i % 2 == 0 else list(executors)[::-1]
                for name in order:
                    results[name].append(_job(executors[name], job))
        finally:
            for executor in executors.values():
                executor.close()
            if ray.is_initialized():
                ray.shutdown()
    base = statistics.median(results["in-process"])
    print(
        f"zoo {zoo.root.name}, one job of {args.samples} samples, median of {repeats} after a warm-up job, interleaved"
    )
    for name, times in results.items():
        med = statistics.median(times)
        print(f"  {name:<11} {med:7.2f} s   ({', '.join(f'{t:.2f}' for t in times)})   {med / base:5.2f}x")
    ratio = statistics.median(results["ray"]) / base
    print(f"Ray overhead: {ratio:.2f}x the in-process executor (target <= 1.2x)")
    return verdict("cloud_ray_overhead", [(ratio <= 1.2, f"Ray {ratio:.2f}x the in-process executor (target <= 1.2)")])


if __name__ == "__main__":
    sys.exit(main())
