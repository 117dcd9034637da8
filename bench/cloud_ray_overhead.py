"""One adaptation job of 240 samples through the Ray executor against the in-process executor (target: <= 1.2x).

Both run the same Worker code (restore learner, label with the teacher, AKD, gate, DWC, save state); the Ray path
adds the actors, the object store and the teacher-actor round trip. Each side runs a warm-up job (models
loaded), then ``--repeats`` jobs of fresh devices; the figure is the ratio of the medians.

    python -m bench.cloud_ray_overhead [--quick] [--zoo DIR] [--samples 240]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import ray

from bench._cloud_setup import add_zoo_option, config, spec, uploads, zoo_paths
from cloud.adaptation.executor import InProcessExecutor
from cloud.adaptation.ray_executor import RayExecutor


def _run(executor, specs) -> list[float]:
    times = []
    for s in specs:
        start = time.perf_counter()
        executor.submit(s)
        done = []
        while not done:
            done = executor.poll(1.0)
        if done[0].error is not None:
            raise done[0].error
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
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
    results = {}
    with tempfile.TemporaryDirectory() as state:
        cfg = config(zoo, ray={"learners": 1, "num_cpus": 2, "teacher_num_cpus": 0.5, "learner_num_cpus": 0.5})
        local = InProcessExecutor(cfg, f"{state}/inprocess")
        results["in-process"] = _run(local, specs)[1:]
        local.close()
        remote = RayExecutor(cfg, f"{state}/ray")
        try:
            results["ray"] = _run(remote, specs)[1:]
        finally:
            remote.close()
            if ray.is_initialized():
                ray.shutdown()
    base = statistics.median(results["in-process"])
    print(f"zoo {zoo.root.name}, one job of {args.samples} samples, median of {repeats} after a warm-up job")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"  {name:<11} {med:7.2f} s   ({', '.join(f'{t:.2f}' for t in times)})   {med / base:5.2f}x")
    ratio = statistics.median(results["ray"]) / base
    verdict = "met" if ratio <= 1.2 else "NOT met"
    print(f"Ray overhead: {ratio:.2f}x the in-process executor (target <= 1.2x): {verdict}")


if __name__ == "__main__":
    main()
