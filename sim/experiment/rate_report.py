"""The rate-recovery table and plot: bytes per uploaded sample against the share of the gap each arm recovers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from sim.experiment.runner import ExperimentResult

MIN_GAP = 0.05
"""Shifts where the teacher beats the unadapted device by less than this are left out of recovery figures."""
MAIN = "tandem"
NAMES = {"tandem": "uts_int8"}


def rate_summary(result: ExperimentResult) -> dict:
    """Per arm: payload and link bytes per sample, and recovery per counted shift (mean over its rounds, last)."""
    facts = result.facts.get("rate_arms")
    if not facts:
        return {}
    rows = defaultdict(dict)
    for r in result.rows:
        rows[(r.round, r.arm)] = r
    shifts: dict[str, list[int]] = defaultdict(list)
    for r in result.rows:
        if r.arm == MAIN:
            shifts[r.shift].append(r.round)
    counted = {}
    for shift, rounds in shifts.items():
        none, teacher = rows[(rounds[0], "none")].accuracy, rows[(rounds[0], "teacher")].accuracy
        if teacher - none >= MIN_GAP:
            counted[shift] = (rounds, none, teacher - none)
    main_bytes = result.facts["uplink_per_sample"]
    arms = {MAIN: {"samples": None, "payload_bytes_per_sample": main_bytes["tandem_bytes"],
                   "link_bytes_per_sample": facts.get(MAIN, {}).get("link_bytes_per_sample")}}  # fmt: skip
    arms.update({k: v for k, v in facts.items() if isinstance(v, dict) and k != MAIN})
    out = {"basis": facts.get("basis"), "jpeg_q90_bytes": main_bytes.get("jpeg_q90_bytes"), "arms": {},
           "shifts": {s: {"none": n, "gap": g} for s, (_, n, g) in counted.items()}}  # fmt: skip
    for arm, b in arms.items():
        per = {}
        for shift, (rounds, none, gap) in counted.items():
            acc = [rows[(x, arm)].accuracy for x in rounds if (x, arm) in rows]
            if acc:
                per[shift] = {"mean": (sum(acc) / len(acc) - none) / gap, "last": (acc[-1] - none) / gap,
                              "mean_accuracy": sum(acc) / len(acc)}  # fmt: skip
        out["arms"][NAMES.get(arm, arm)] = {**b, "recovery": per}
    return out


def rate_markdown(s: dict) -> str:
    """The table (markdown)."""
    shifts = list(s["shifts"])
    md = [
        "## Rate and recovery",
        "",
        f"Bytes per uploaded sample (payload; link = the payload's SampleChunk message) and the share of the "
        f"teacher-device gap recovered, mean over each shift's rounds (last round in brackets); shifts with a gap "
        f"below {100 * MIN_GAP:.0f} points are left out. Basis {s['basis']}; JPEG q90 of the UTS-chosen frames "
        f"{s['jpeg_q90_bytes']:,.0f} B.",
        "",
        "| arm | payload B/sample | link B/sample | "
        + " | ".join(f"{x} (gap {100 * s['shifts'][x]['gap']:.1f})" for x in shifts)
        + " |",  # fmt: skip
        "|" + "---|" * (3 + len(shifts)),
    ]
    for arm, a in s["arms"].items():
        link = a.get("link_bytes_per_sample")
        cells = []
        for x in shifts:
            r = a["recovery"].get(x)
            cells.append(f"{100 * r['mean']:.1f}% ({100 * r['last']:.0f}%)" if r else "")
        md.append(f"| {arm} | {a['payload_bytes_per_sample']:,.0f} | {'' if link is None else f'{link:,.0f}'} | "
                  + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(md) + "\n"


def rate_plot(s: dict, path: Path) -> None:
    """Recovery (mean over counted shifts) against link bytes per sample, one point per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, a in s["arms"].items():
        rec = [r["mean"] for r in a["recovery"].values()]
        x = a.get("link_bytes_per_sample") or a["payload_bytes_per_sample"]
        if not rec:
            continue
        y = 100 * sum(rec) / len(rec)
        marker = "s" if arm.startswith("jpeg") else ("^" if arm.endswith("int8") else "o")
        ax.scatter([x], [y], marker=marker, s=50)
        ax.annotate(arm, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per uploaded sample on the link (log)")
    ax.set_ylabel("gap recovered, mean over shifts and rounds (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_rate_report(result: ExperimentResult, out_dir: Path) -> dict[str, Path]:
    """rate_recovery.md and rate_recovery.png (nothing when the run had no rate arms)."""
    s = rate_summary(result)
    if not s:
        return {}
    paths = {"rate_table": out_dir / "rate_recovery.md", "rate_plot": out_dir / "rate_recovery.png"}
    paths["rate_table"].write_text(rate_markdown(s))
    rate_plot(s, paths["rate_plot"])
    return paths
