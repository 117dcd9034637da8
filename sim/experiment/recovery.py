"""Gap recovery per shift of the offline experiment: Tandem and the true-label ceiling against no adaptation and the
teacher, and Tandem's share of the ceiling. Only steps whose gap to the teacher is at least ``MIN_GAP`` are scored
(on a few hundred held-out samples a smaller gap is within noise)."""

from __future__ import annotations

from collections import defaultdict

MIN_GAP = 0.05
"""A shift whose teacher-minus-no-adaptation gap is below this is reported but not scored (the offline experiment
and the fleet report alike)."""


def gap_share(value: float | None, base: float, top: float | None) -> float | None:
    """Share of the way from ``base`` to ``top`` that ``value`` went (None without both or a positive gap)."""
    if value is None or top is None or top - base <= 0:
        return None
    return (value - base) / (top - base)


def per_shift(rows) -> list[dict]:
    """Per shift, in stream order: references, per-round accuracies and shares, and the step's end figures."""
    acc = {(r.round, r.arm): r.accuracy for r in rows}
    rounds: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r.arm == "tandem":
            rounds[r.shift].append(r.round)
    out = []
    for shift, rs in rounds.items():
        none, teacher = acc[(rs[0], "none")], acc[(rs[0], "teacher")]
        tandem = [acc[(x, "tandem")] for x in rs]
        ceiling = [acc.get((x, "ceiling")) for x in rs]
        out.append(
            {
                "shift": shift,
                "none": none,
                "teacher": teacher,
                "gap": teacher - none,
                "scored": teacher - none >= MIN_GAP,
                "tandem_by_round": tandem,
                "ceiling_by_round": ceiling,
                "recovery_by_round": [gap_share(t, none, teacher) for t in tandem],
                "ceiling_recovery_by_round": [gap_share(c, none, teacher) for c in ceiling],
                "share_of_ceiling_by_round": [
                    gap_share(t, none, c) if c is not None else None for t, c in zip(tandem, ceiling, strict=True)
                ],
                "margin_vs_none_min": min(t - none for t in tandem),
            }
        )
    for p in out:
        p["recovery_end"] = p["recovery_by_round"][-1]
        p["ceiling_recovery_end"] = p["ceiling_recovery_by_round"][-1]
        p["share_of_ceiling_end"] = p["share_of_ceiling_by_round"][-1]
    return out


def worst(shifts: list[dict], key: str) -> float | None:
    """The lowest ``key`` over the scored shifts (None when none is scored or none has the figure)."""
    values = [p[key] for p in shifts if p["scored"] and p[key] is not None]
    return min(values) if values else None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def targets(shifts: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The recovery targets at each step's end (the last round of the shift), scored steps only."""
    rec, share = worst(shifts, "recovery_end"), worst(shifts, "share_of_ceiling_end")
    margin = min((p["margin_vs_none_min"] for p in shifts), default=None)
    scored = f"steps with a gap >= {100 * MIN_GAP:.0f} pt"
    return [
        (f"worst recovery at a step's end >= 65% ({scored})", _pct(rec), None if rec is None else rec >= 0.65),
        (f"Tandem >= 90% of the ceiling's gain ({scored})", _pct(share), None if share is None else share >= 0.9),
        (
            "never more than 1 point below no adaptation",
            "n/a" if margin is None else f"{100 * margin:+.1f} pt",
            None if margin is None else margin >= -0.01 - 1e-9,
        ),
    ]


def markdown_lines(shifts: list[dict]) -> list[str]:
    """The per-shift recovery table (markdown)."""
    md = [
        "",
        "## Gap recovery per shift",
        "",
        f"Recovered share of the gap no adaptation -> teacher, by round; Tandem / ceiling is Tandem's gain over its "
        f"true-label ceiling's gain. Shifts with a gap below {100 * MIN_GAP:.0f} points are not scored (marked -).",
        "",
        "| shift | none | Tandem (end) | ceiling (end) | teacher | gap pt | Tandem recovered | ceiling recovered "
        "| Tandem / ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in shifts:
        end_c = p["ceiling_by_round"][-1]
        cells = [
            p["shift"] + ("" if p["scored"] else " (-)"),
            f"{100 * p['none']:.1f}",
            f"{100 * p['tandem_by_round'][-1]:.1f}",
            "n/a" if end_c is None else f"{100 * end_c:.1f}",
            f"{100 * p['teacher']:.1f}",
            f"{100 * p['gap']:.1f}",
        ]
        cells += [", ".join(_pct(v) for v in p[k]) for k in ("recovery_by_round", "ceiling_recovery_by_round")]
        cells.append(", ".join(_pct(v) for v in p["share_of_ceiling_by_round"]))
        md.append("| " + " | ".join(cells) + " |")
    return md
