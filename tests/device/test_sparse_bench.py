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


def test_targets_tell_equal_budget_rows_from_rows_spending_more_tokens() -> None:
    from bench.sparsevlm import Method, target_lines

    def row(name: str, budget: str, correct: int, mean_tokens: float) -> Method:
        return Method(name, budget, None, correct={"clear": correct}, total={"clear": 100}, mean_counts=[mean_tokens])

    dense = row("dense", "144", 90, 144.0)
    tandem = row("tandem", "64->16", 88, 16.0)
    parity = row("paper-parity", "64->16", 89, 76.0)  # above tandem, but with far more tokens
    lines = target_lines([dense, tandem, parity], ["clear"], [], [64], [], True)
    assert any(x.startswith("- MISS: budget 64: % of dense") for x in lines)
    assert any(x.startswith("- PASS: budget 64: tandem against rows at the same layer average") for x in lines)
    divprune = row("divprune", "64->16", 89, 16.0)  # above tandem at the same count
    lines = target_lines([dense, tandem, divprune], ["clear"], [], [64], [], True)
    assert any(x.startswith("- MISS: budget 64: tandem against rows at the same layer average") for x in lines)
