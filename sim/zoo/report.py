"""Evaluation tables of zoo members: accuracy per domain and per question type (rich + markdown)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich.table import Table

from sim.world import QUESTION_TYPES
from sim.zoo.evaluate import Accuracy


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def domain_rows(results: Mapping[str, Mapping[str, Accuracy]], domains: Sequence[str]) -> list[list[str]]:
    """One row per model: accuracy on every domain, the mean over domains and the minimum."""
    rows = []
    for model, per_domain in results.items():
        values = [per_domain[d].value for d in domains]
        rows.append([model, *(_pct(v) for v in values), _pct(sum(values) / len(values)), _pct(min(values))])
    return rows


def sampling_error_note(results: Mapping[str, Mapping[str, Accuracy]], domains: Sequence[str]) -> str:
    """One line: the largest standard error of a domain cell (binomial, in points) and the sample count behind
    it, so a reader can tell a real difference from sampling noise."""
    cells = [per_domain[d] for per_domain in results.values() for d in domains if per_domain[d].total]
    if not cells:
        return "no samples evaluated"
    worst = max(cells, key=lambda a: a.value * (1 - a.value) / a.total)
    se = 100 * math.sqrt(worst.value * (1 - worst.value) / worst.total)
    return f"one standard error per domain cell: at most {se:.1f} points ({min(a.total for a in cells)} samples)"


def qtype_rows(results: Mapping[str, Mapping[str, Accuracy]], domains: Sequence[str]) -> list[list[str]]:
    """One row per (model, clear / shifted mean): accuracy per question type."""
    rows = []
    for model, per_domain in results.items():
        clear = [d for d in domains if d == "clear"]
        shifted = [d for d in domains if d != "clear"]
        for label, group in (("clear", clear), ("shifted", shifted)):
            if not group:
                continue
            vals = []
            for q in QUESTION_TYPES:
                c = sum(per_domain[d].by_type.get(q, [0, 0])[0] for d in group)
                t = sum(per_domain[d].by_type.get(q, [0, 0])[1] for d in group)
                vals.append(_pct(c / t) if t else "-")
            rows.append([f"{model} ({label})", *vals])
    return rows


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title, header_style="bold")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
