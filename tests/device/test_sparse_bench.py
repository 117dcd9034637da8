"""The SparseVLM benchmark's rows and model selection (the measurements themselves are bench runs)."""

from __future__ import annotations

from bench.sparsevlm import REFERENCE_DIR, _models, build_methods, parse_args


def test_rows_per_budget_at_the_papers_layer_average() -> None:
    methods = build_methods(144, [192, 128, 64], None)
    assert methods[0].name == "dense" and methods[0].cfg is None
    names = [m.name for m in methods[1:8]]
    assert names == ["tandem", "tandem-rel", "paper-parity", "fastv", "random", "visionzip", "divprune"]
    assert len(methods) == 1 + 3 * 7
    for m in methods[1:]:
        label = int(m.budget.split("->")[0])
        assert m.budget == f"{label}->{round(label * 144 / 576)}"
        if m.name in ("tandem", "tandem-rel", "random", "visionzip", "divprune"):
            plan = m.cfg.plan(144, 2)
            assert abs(sum(plan) / 2 - label / 4) <= 0.5  # layer average = the paper's budget scaled
    assert build_methods(144, [64], 0.5)[-1].budget == "rank(l=0.5)"


def test_default_models_are_the_shipped_reference_zoo() -> None:
    models = _models(parse_args([]))
    assert all(d is not None and str(d).startswith(str(REFERENCE_DIR)) for d, _ in models)
    accuracy = [d.relative_to(REFERENCE_DIR).as_posix() for d, acc in models if acc]
    speed = [d.relative_to(REFERENCE_DIR).as_posix() for d, acc in models if not acc]
    assert {"base/teacher", "base/device"} <= set(accuracy) and speed == ["base576/device"]
    explicit = _models(parse_args(["--model-dir", "a", "--speed-dir", "b"]))
    assert [(str(d), acc) for d, acc in explicit] == [("a", True), ("b", False)]
