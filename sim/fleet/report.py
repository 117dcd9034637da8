"""The run's report in ``reports/<run>/``: results.json, the PNG plots, one self-contained index.html, and the
summary table on the console."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sim.fleet.plots import write_plots
from sim.fleet.results import DeviceResult, FleetResult
from sim.fleet.run_facts import simulation_lines
from sim.fleet.summary import percentile, summarize, targets


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _kb(n: int) -> str:
    return f"{n / 1024:,.0f}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


def device_rows(result: FleetResult) -> tuple[list[str], list[list[str]]]:
    """One row per device: link, versions, bytes, latency, end accuracy against the references."""
    head = ["device", "cohort", "link", "version", "updates", "rollbacks", "refused", "up KB", "down KB",
            "latency p50 s", "acc", "none", "ceiling", "teacher", "lost"]  # fmt: skip
    rows = []
    for d in result.devices:
        last = d.points[-1] if d.points else None
        rows.append(
            [
                d.device_id,
                d.cohort,
                _link_text(d),
                last.version if last else "-",
                str(len(d.updates)),
                str(len(d.rollbacks)),
                str(d.refused_candidates),
                _kb(d.up_bytes),
                _kb(d.down_bytes),
                _s(percentile(d.latencies_s(), 50)),
                _pct(last.accuracy if last else None),
                _pct(last.none if last else None),
                _pct(last.ceiling if last else None),
                _pct(last.teacher if last else None),
                str(d.samples.lost),
            ]
        )
    return head, rows


def _link_text(d: DeviceResult) -> str:
    link = d.link
    up = link.get("up_mbps")
    text = "unlimited" if up is None else (f"{up * 1000:g} kbit/s" if up < 1 else f"{up:g} Mbit/s")
    if link.get("loss"):
        text += f", {100 * link['loss']:g}% loss"
    if link.get("outages"):
        text += f", {len(link['outages'])} outage(s)"
    if link.get("trace"):
        text += ", trace"
    return text


def fleet_lines(summary: dict) -> list[tuple[str, str]]:
    """The fleet aggregates as label / value pairs."""
    lat, ask, ack = summary["update_latency_s"], summary["ask_ms"], summary["upload_ack_ms"]
    return [
        ("devices", str(summary["devices"])),
        ("frames answered", f"{summary['frames']:,}"),
        ("samples acked / lost / stored twice",
         f"{summary['samples_acked']:,} / {summary['samples_lost']} / {summary['samples_stored_twice']}"),
        ("updates published / applied / superseded / rejected / in flight at the end",
         f"{summary['updates_published']} / {summary['updates_applied']} / {summary['updates_superseded']} / "
         f"{summary['updates_rejected']} / {summary['updates_in_flight']}"),
        ("rollbacks / refused candidates", f"{summary['rollbacks']} / {summary['refused_candidates']}"),
        ("uplink (links) / send-everything", f"{_kb(summary['up_bytes'])} KB / {_kb(summary['send_all_bytes'])} KB"),
        ("downlink (links) per applied update", "n/a" if summary["downlink_per_update_bytes"] is None
         else f"{summary['downlink_per_update_bytes'] / 1024:,.1f} KB"),
        ("update payload per applied update", "n/a" if summary["update_payload_per_update_bytes"] is None
         else f"{summary['update_payload_per_update_bytes'] / 1024:,.1f} KB"),
        ("update latency p50 / p90 / p99 (s)", f"{_s(lat['p50'])} / {_s(lat['p90'])} / {_s(lat['p99'])}"),
        ("Ask latency p50 / p99 (ms)", f"{_ms(ask['p50'])} / {_ms(ask['p99'])}"),
        ("upload-ack latency p50 / p99 (ms)", f"{_ms(ack['p50'])} / {_ms(ack['p99'])}"),
        ("recovery of the gap: worst / mean", f"{_pct(summary['recovery_min'])}% / {_pct(summary['recovery_mean'])}%"),
        ("share of the true-label ceiling's gain: worst", f"{_pct(summary.get('share_of_ceiling_min'))}%"),
    ]  # fmt: skip


def print_summary(result: FleetResult, console: Console | None = None) -> dict:
    """The console summary: per-device table, fleet aggregates, targets. Returns the summary."""
    console = console or Console()
    summary = summarize(result)
    head, rows = device_rows(result)
    table = Table(title=f"fleet run {result.run}", show_lines=False)
    for h in head:
        table.add_column(h, justify="left" if h in ("device", "cohort", "link", "version") else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    agg = Table(show_header=False, title="fleet")
    for k, v in fleet_lines(summary):
        agg.add_row(k, v)
    console.print(agg)
    sim = Table(show_header=False, title="what was simulated")
    for k, v in simulation_lines(result):
        sim.add_row(k, escape(v))
    console.print(sim)
    tt = Table(title="targets")
    for h in ("target", "measured", "met"):
        tt.add_column(h)
    for t in targets(summary):
        tt.add_row(
            t["target"], t["shown"], {True: "[green]yes[/]", False: "[red]no[/]", None: "not measured"}[t["met"]]
        )
    console.print(tt)
    return summary


def _table_html(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    alt = html.escape(alt)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}.yes{color:#080}.no{color:#b00}"""


SHARES = ("recovery", "ceiling_recovery", "share_of_ceiling")
"""Per drift step: Tandem's and the ceiling's share of the gap to the teacher, Tandem's share of the ceiling's gain
(n/a where the gap is below ``summary.MIN_GAP``)."""


def _share_text(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def render_html(result: FleetResult, summary: dict, plots: dict[str, Path]) -> str:
    """One self-contained page: the plots inline (base64), the tables, the scenario."""
    sc = result.scenario
    zoo = result.facts.get("zoo", sc.get("zoo"))
    met = {True: '<span class="yes">yes</span>', False: '<span class="no">no</span>', None: "not measured"}
    trows = "".join(
        f"<tr><td>{html.escape(t['target'])}</td><td>{html.escape(t['shown'])}</td><td>{met[t['met']]}</td></tr>"
        for t in targets(summary)
    )
    phases = [
        [r["device"], r["domain"], f"{r['end_s']:.0f}", _pct(r["accuracy"]), _pct(r["none"]),
         _pct(r.get("ceiling")), _pct(r["teacher"])] + [_share_text(r.get(k)) for k in SHARES]
        for r in summary["phases"]
    ]  # fmt: skip
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Tandem fleet run {html.escape(result.run)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Tandem fleet run <code>{html.escape(result.run)}</code></h1>",
        f"<p>Scenario <b>{html.escape(str(sc.get('name')))}</b>: {html.escape(str(sc.get('description', '')))}; "
        f"{len(result.devices)} devices, {sc.get('duration_s')} s, zoo {html.escape(str(zoo))}.</p>",
        "<h2>What was simulated</h2>",
        _table_html(["", "value"], [list(x) for x in simulation_lines(result)]),
        "<h2>Targets</h2><table><thead><tr><th>target</th><th>measured</th><th>met</th></tr></thead>",
        f"<tbody>{trows}</tbody></table>",
        "<h2>Fleet</h2>",
        _table_html(["", "value"], [list(x) for x in fleet_lines(summary)]),
        _img(plots["accuracy"], "Held-out accuracy of each device's current domain with its current adapters, against "
             "no adaptation and the teacher on the same samples; dotted lines: drift steps; ticks: updates applied"),
        _img(plots["bytes"], "Bytes per device measured on its link, and what sending every frame would have cost"),
        _img(plots["latency_cdf"], "Capture-to-applied latency: from a sample's capture to the first update that "
             "learnt from it being applied on the device"),
        "<h2>Devices</h2>",
        _table_html(*device_rows(result)),
        "<h2>Drift steps: recovery of the gap to the teacher</h2>",
        _table_html(["device", "domain", "end (s)", "acc", "none", "ceiling", "teacher", "recovery",
                     "ceiling recovery", "share of ceiling"], phases),
        "<h2>Run facts</h2>",
        f"<pre>{html.escape(json.dumps(result.facts, indent=2, default=str))}</pre>",
        "<h2>Scenario</h2>",
        f"<pre>{html.escape(json.dumps(sc, indent=2, default=str))}</pre>",
        "</body></html>",
    ]  # fmt: skip
    return "\n".join(parts)


def write_report(result: FleetResult, out_dir: Path) -> dict[str, Path]:
    """results.json, the PNGs and index.html in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    paths = write_plots(result, out_dir)
    data = result.model_dump(mode="json")
    data["summary"] = summary
    data["targets"] = targets(summary)
    paths["json"] = out_dir / "results.json"
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    paths["html"] = out_dir / "index.html"
    paths["html"].write_text(render_html(result, summary, paths))
    return paths


def load_results(path: Path) -> FleetResult:
    """A saved results.json back as a FleetResult (the summary is recomputed)."""
    data = json.loads(Path(path).read_text())
    data.pop("summary", None)
    data.pop("targets", None)
    return FleetResult.model_validate(data)
