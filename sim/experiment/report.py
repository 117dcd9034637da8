"""Tables (console and markdown), target checks and the plot of the offline experiment."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sim.experiment import recovery
from sim.experiment.runner import ARM_LABELS, ExperimentResult

ARM_ORDER = ("none", "tandem", "ceiling", "tandem_fp32", "send_all", "ce_only", "teacher")
SHORT = {
    "none": "none",
    "tandem": "Tandem",
    "ceiling": "ceiling",
    "tandem_fp32": "fp32 dl",
    "send_all": "send all",
    "ce_only": "CE only",
    "teacher": "teacher",
}


def _by(result: ExperimentResult) -> dict[tuple[int, str], dict]:
    table: dict[tuple[int, str], dict] = {}
    for r in result.rows:
        table[(r.round, r.arm)] = r.__dict__
    return table


def _arms(result: ExperimentResult) -> list[str]:
    present = {r.arm for r in result.rows}
    return [a for a in ARM_ORDER if a in present]


def summarize(result: ExperimentResult) -> dict:
    """The issue's targets, measured."""
    by = _by(result)
    rounds = sorted({r.round for r in result.rows})
    arms = _arms(result)
    out: dict = {"per_shift": recovery.per_shift(result.rows)}
    out["recovery_worst"] = recovery.worst(out["per_shift"], "recovery_end")
    out["share_of_ceiling_worst"] = recovery.worst(out["per_shift"], "share_of_ceiling_end")
    out["margin_vs_none_min"] = min((p["margin_vs_none_min"] for p in out["per_shift"]), default=None)

    def total(arm: str, key: str) -> float:
        return float(sum(by[(x, arm)][key] for x in rounds if (x, arm) in by))

    def gain(arm: str) -> float:
        return float(sum(by[(x, arm)]["accuracy"] - by[(x, "none")]["accuracy"] for x in rounds if (x, arm) in by))

    if "send_all" in arms:
        out["uplink_ratio"] = total("tandem", "uplink_bytes") / max(1.0, total("send_all", "uplink_bytes"))
        sa_gain = gain("send_all")
        out["gain_retention"] = gain("tandem") / sa_gain if sa_gain > 0 else float("nan")
    if "tandem_fp32" in arms:
        out["downlink_ratio"] = total("tandem", "downlink_bytes") / max(1.0, total("tandem_fp32", "downlink_bytes"))
        diffs = [by[(x, "tandem_fp32")]["accuracy"] - by[(x, "tandem")]["accuracy"] for x in rounds]
        out["dwc_loss_points_mean"] = 100 * sum(diffs) / len(diffs)
        out["dwc_loss_points_max"] = 100 * max(diffs)
    if "ce_only" in arms:
        out["kd_gain_points_mean"] = 100 * (gain("tandem") - gain("ce_only")) / len(rounds)
    out["total_wall_s"] = result.facts.get("total_wall_s")
    return out


def _targets(s: dict) -> list[tuple[str, str, bool | None]]:
    rows = recovery.targets(s["per_shift"])
    if "uplink_ratio" in s:
        rows.append(
            (
                "UTS uplink <= 20% of send-everything",
                f"{100 * s['uplink_ratio']:.1f}%",
                s["uplink_ratio"] <= 0.2,
            )
        )
        rows.append(
            (
                "UTS keeps >= 90% of send-everything's gain",
                f"{100 * s['gain_retention']:.0f}%",
                s["gain_retention"] >= 0.9,
            )
        )
    if "downlink_ratio" in s:
        rows.append(
            (
                "DWC downlink <= 1/20 of fp32 adapter",
                f"1/{1 / max(s['downlink_ratio'], 1e-9):.1f}",
                s["downlink_ratio"] <= 0.05,
            )
        )
        rows.append(
            (
                "DWC accuracy loss <= 1 point (mean over rounds)",
                f"{s['dwc_loss_points_mean']:.2f} pt",
                s["dwc_loss_points_mean"] <= 1.0,
            )
        )
    if s.get("total_wall_s") is not None:
        rows.append(("wall time <= 15 min", f"{s['total_wall_s'] / 60:.1f} min", s["total_wall_s"] <= 900))
    return rows


def _round_lines(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    by = _by(result)
    arms = _arms(result)
    head = ["rnd", "shift"] + [SHORT[a] for a in arms]
    head += ["up B UTS / all", "down B DWC / fp32", "wall s"]
    lines = []
    for x in sorted({r.round for r in result.rows}):
        t = by[(x, "tandem")]
        cells = [str(x), f"{t['shift']} #{t['shift_round']}"]
        cells += [f"{100 * by[(x, a)]['accuracy']:.1f}" for a in arms]
        sa = by.get((x, "send_all"), {}).get("uplink_bytes")
        fp = by.get((x, "tandem_fp32"), {}).get("downlink_bytes")
        cells.append(f"{t['uplink_bytes']:,} / {sa:,}" if sa is not None else f"{t['uplink_bytes']:,}")
        cells.append(f"{t['downlink_bytes']:,} / {fp:,}" if fp is not None else f"{t['downlink_bytes']:,}")
        cells.append(f"{t['wall_s']:.1f}")
        lines.append(cells)
    return head, lines


def print_report(result: ExperimentResult, console: Console | None = None) -> None:
    """The per-round table and the target checks on the console."""
    console = console or Console()
    head, lines = _round_lines(result)
    table = Table(title="held-out accuracy (%) of the current domain per round; bytes per round")
    for h in head:
        table.add_column(h, justify="right")
    for line in lines:
        table.add_row(*line)
    console.print(table)
    checks = Table(title="targets")
    for h in ("target", "measured", "met"):
        checks.add_column(h)
    for name, value, ok in _targets(summarize(result)):
        checks.add_row(name, value, "n/a" if ok is None else "[green]yes[/]" if ok else "[red]no[/]")
    console.print(checks)


def _label_lines(result: ExperimentResult) -> list[str]:
    """How often the teacher's pseudo-answers to each arm's uploads were right, per round (markdown)."""
    labelled = [r for r in result.rows if r.label_accuracy is not None]
    if not labelled:
        return []
    md = [
        "",
        "## Teacher pseudo-answers on the uploads",
        "",
        "Share right against the world's answers (a simulation-only diagnostic); for UTS, in brackets, the "
        "teacher on the same frames with every visual token.",
        "",
    ]
    arms = [a for a in _arms(result) if a in {r.arm for r in labelled}]
    md.append("| rnd | shift | " + " | ".join(SHORT[a] for a in arms) + " |")
    md.append("|" + "---|" * (2 + len(arms)))
    by = {(r.round, r.arm): r for r in labelled}
    for rnd in sorted({r.round for r in labelled}):
        first = next(r for r in labelled if r.round == rnd)
        cells = []
        for arm in arms:
            row = by.get((rnd, arm))
            if row is None:
                cells.append("")
                continue
            full = f" ({100 * row.label_accuracy_all_tokens:.1f})" if row.label_accuracy_all_tokens is not None else ""
            cells.append(f"{100 * row.label_accuracy:.1f}{full}")
        md.append(f"| {rnd} | {first.shift} #{first.shift_round} | " + " | ".join(cells) + " |")
    return md


def markdown(result: ExperimentResult) -> str:
    """The report as markdown (tables, targets, byte facts)."""
    head, lines = _round_lines(result)
    s = summarize(result)
    f = result.facts
    md = ["# Offline continual-adaptation experiment", ""]
    cfg = result.config
    md.append(
        f"Recipe `{cfg['recipe']}`, seed {cfg['seed']}, shifts {', '.join(cfg['shifts'])}; "
        f"{cfg['rounds_per_shift']} rounds per shift, {cfg['stream_per_round']} stream frames per round, "
        f"{cfg['eval_size']} held-out samples per domain; uplink budget {cfg['uplink_samples_per_round']} "
        f"samples/round, keep ratio {cfg['keep_ratio']}; "
        f"downlink budget {f['downlink_budget_bytes']:,} B/round."
    )
    md += [
        "",
        "Accuracy in % on held-out samples of the current domain. Columns: "
        + "; ".join(f"{SHORT[a]} = {ARM_LABELS[a]}" for a in _arms(result))
        + ".",
        "",
    ]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    md += ["| " + " | ".join(line) + " |" for line in lines]
    md += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    md += [f"| {n} | {v} | {'n/a' if ok is None else 'yes' if ok else 'no'} |" for n, v, ok in _targets(s)]
    md += recovery.markdown_lines(s["per_shift"])
    md += _label_lines(result)
    up = f["uplink_per_sample"]
    md += ["", "## Bytes", ""]
    md.append(f"- adapter: {f['adapter_params']:,} parameters, {f['fp32_adapter_bytes']:,} B as fp32 safetensors")
    if up.get("raw_frame_bytes"):
        all_tokens = f"all tokens {up['send_all_bytes']:,.0f} B; " if up.get("send_all_bytes") else ""
        md.append(
            f"- per uploaded sample: UTS {up['tandem_bytes']:,.0f} B; {all_tokens}"
            f"raw frame {up['raw_frame_bytes']:,.0f} B; JPEG q90 {up['jpeg_q90_bytes']:,.0f} B"
        )
    if "kd_gain_points_mean" in s:
        md.append(f"- KD + alignment vs CE-only: {s['kd_gain_points_mean']:+.2f} points mean over rounds")
    ca = f["clear_accuracy"]
    md.append(f"- clear domain: device {100 * ca['device']:.1f}%, teacher {100 * ca['teacher']:.1f}%")
    md.append(f"- total wall time {f['total_wall_s']:.0f} s")
    return "\n".join(md) + "\n"


def plot(result: ExperimentResult, path: Path) -> None:
    """Accuracy per round per arm (top) and uplink / downlink bytes per round (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by(result)
    rounds = sorted({r.round for r in result.rows})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for a in _arms(result):
        ax1.plot(rounds, [100 * by[(x, a)]["accuracy"] for x in rounds], marker="o", label=ARM_LABELS[a])
    ax1.set_ylabel("held-out accuracy (%)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    series = [
        ("tandem", "uplink_bytes", "uplink UTS"),
        ("send_all", "uplink_bytes", "uplink send-everything"),
        ("tandem", "downlink_bytes", "downlink DWC"),
        ("tandem_fp32", "downlink_bytes", "downlink fp32"),
    ]
    for arm, key, label in series:
        if (rounds[0], arm) in by:
            ax2.plot(rounds, [max(1, by[(x, arm)][key]) for x in rounds], marker="s", label=label)
    ax2.set_yscale("log")
    ax2.set_ylabel("bytes per round")
    ax2.set_xlabel("round")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    shifts = [(r.round, r.shift) for r in result.rows if r.arm == "tandem" and r.shift_round == 1]
    for x, name in shifts:
        ax1.axvline(x - 0.5, color="grey", lw=0.5)
        ax1.text(x - 0.45, ax1.get_ylim()[1], name, fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: ExperimentResult, out_dir: Path) -> dict[str, Path]:
    """table.md, plot.png and results.json under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "table.md", "plot": out_dir / "plot.png", "json": out_dir / "results.json"}
    paths["table"].write_text(markdown(result))
    plot(result, paths["plot"])
    data = result.to_dict()
    data["summary"] = summarize(result)
    from sim.experiment.rate_report import rate_summary, write_rate_report

    paths.update(write_rate_report(result, out_dir))
    if result.facts.get("rate_arms"):
        data["rate_summary"] = rate_summary(result)
    paths["json"].write_text(json.dumps(data, indent=1, default=float))
    return paths
