"""`python -m bench`'s verdict protocol (bench/__main__.py): a missed target, a crash or a missing verdict makes the
run fail; every benchmark gets one verdict line at the end. Exercised on small benchmark modules written here,
then checked against every real benchmark module's entry point."""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap

import pytest

import bench
from bench.__main__ import available, main

BENCHES = {
    "zz_pass": 'return verdict("zz_pass", [(True, "ratio 0.5x (target < 1)")])',
    "zz_miss": 'return verdict("zz_miss", [(True, "a"), (False, "ratio 1.5x (target < 1)")])',
    "zz_skip": 'return skipped("zz_skip", "needs a CUDA GPU")',
    "zz_crash": 'raise RuntimeError("boom")',
    "zz_silent": "return 0",
}


@pytest.fixture
def fake_benches(tmp_path, monkeypatch):
    pkg = tmp_path / "extra"
    pkg.mkdir()
    for name, body in BENCHES.items():
        (pkg / f"{name}.py").write_text(
            "from bench._verdict import skipped, verdict\n\n\n"
            f"def main(argv=None) -> int:\n{textwrap.indent(body, '    ')}\n"
        )
    monkeypatch.setattr(bench, "__path__", [*bench.__path__, str(pkg)])
    yield
    for name in BENCHES:
        sys.modules.pop(f"bench.{name}", None)


def test_a_missed_target_fails_the_run_and_every_benchmark_has_one_verdict(fake_benches, capsys):
    assert main(["zz_pass", "zz_skip"]) == 0
    assert main(["zz_pass", "zz_miss"]) == 1
    tail = capsys.readouterr().out.split("=== verdicts ===")[-1].strip().splitlines()
    assert tail[:2] == [
        "VERDICT zz_pass: PASS ratio 0.5x (target < 1)",
        "VERDICT zz_miss: FAIL ratio 1.5x (target < 1)",
    ]
    for name, why in (("zz_crash", "crashed: RuntimeError: boom"), ("zz_silent", "printed 0 verdict lines")):
        assert main([name]) == 1
        assert f"VERDICT {name}: FAIL {why}" in capsys.readouterr().out


def test_every_benchmark_module_follows_the_protocol():
    for name in available():
        source = inspect.getsource(importlib.import_module(f"bench.{name}"))
        assert "def main(argv: list[str] | None = None) -> int:" in source, name
        assert "sys.exit(main())" in source and ("verdict(" in source or "VERDICT " in source), name
