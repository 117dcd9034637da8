"""Run Tandem's benchmarks: ``python -m bench [NAME ...] [--full]`` (quick sizes unless ``--full``).

Each benchmark is also runnable alone as ``python -m bench.<name>`` with its own options (``--help``).
Every figure a benchmark prints is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench

NOT_BENCHMARKS = {"transport_common"}


def available() -> list[str]:
    """Names of the benchmark modules in this package."""
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if n not in NOT_BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        print("benchmarks:", ", ".join(available()))
        return 0
    full = "--full" in args
    names = [a for a in args if not a.startswith("-")] or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"error: unknown benchmark {', '.join(unknown)}; known: {', '.join(available())}", file=sys.stderr)
        return 2
    for name in names:
        print(f"\n=== bench.{name} ({'full' if full else 'quick'}) ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        module.main([] if full else ["--quick"])
        print(f"=== bench.{name}: {time.perf_counter() - start:.0f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
