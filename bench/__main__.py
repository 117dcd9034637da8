"""Run Tandem's benchmarks: ``python -m bench [NAME ...] [--full]`` (quick sizes unless ``--full``).

Each benchmark is also runnable alone as ``python -m bench.<name>`` with its own options (``--help``).

The verdict protocol (every module ``bench/<name>.py`` not starting with ``_`` follows it):

- ``main(argv: list[str] | None = None) -> int``; ``--quick`` selects the quick sizes ``python -m bench`` runs.
- Targets are ratios against a baseline measured in the same run. Where two settings are compared, their repeats
  are interleaved (A, B, B, A, ... or request by request), so load drift on a shared machine hits both alike. An
  absolute figure is a target only where nothing else makes sense (a count that must be 0, a configured rate),
  and the output says so.
- A benchmark ends by printing exactly one line ``VERDICT <name>: PASS|FAIL <reason>`` (``bench._verdict``) and
  returns 0 on PASS, 1 on FAIL; run alone, that is its exit code. ``VERDICT <name>: SKIP <reason>`` (exit 0) is
  for a benchmark that cannot measure here at all (a GPU benchmark without a GPU), never for a missed target.
- ``python -m bench`` runs the chosen benchmarks in turn, repeats their verdict lines at the end, and exits 1 when
  any benchmark failed, crashed or gave no verdict.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
import sys
import time
import traceback

import bench

NOT_BENCHMARKS = {"transport_common"}


def available() -> list[str]:
    """Names of the benchmark modules in this package."""
    names = [m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if n not in NOT_BENCHMARKS)


class _Tee(io.TextIOBase):
    """Write through to ``stream`` and keep the lines that start with ``VERDICT``."""

    def __init__(self, stream) -> None:
        self.stream, self.buffer, self.verdicts = stream, "", []

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        self.verdicts += [ln for ln in lines if ln.startswith("VERDICT ")]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def run_one(name: str, full: bool) -> tuple[int, str]:
    """Run ``bench.<name>``; returns (exit code, its verdict line or why there is none)."""
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            code = importlib.import_module(f"bench.{name}").main([] if full else ["--quick"])
    except SystemExit as exc:  # argparse and friends
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        traceback.print_exc()
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        return 1, f"VERDICT {name}: FAIL crashed: {type(exc).__name__}: {first}"
    mine = [v for v in tee.verdicts if v.startswith(f"VERDICT {name}:")]
    if len(mine) != 1:
        return 1, f"VERDICT {name}: FAIL printed {len(mine)} verdict lines (exit code {code})"
    if (code != 0) != (": FAIL " in mine[0]):
        return 1, f"VERDICT {name}: FAIL exit code {code} disagrees with {mine[0]!r}"
    return int(code or 0), mine[0]


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
    results = []
    for name in names:
        print(f"\n=== bench.{name} ({'full' if full else 'quick'}) ===", flush=True)
        start = time.perf_counter()
        results.append(run_one(name, full))
        print(f"=== bench.{name}: {time.perf_counter() - start:.0f} s ===", flush=True)
    print("\n=== verdicts ===")
    for _, line in results:
        print(line)
    failed = [line for code, line in results if code != 0]
    print(f"{len(results) - len(failed)} of {len(results)} benchmarks passed or skipped; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
