"""The fleet report from a small results set: summary figures, targets, PNGs, one self-contained page, JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from sim.fleet.report import load_results, print_summary, write_report
from sim.fleet.results import DeviceResult, FleetResult, Point, Rollback, SampleCounts, UpdateApplied
from sim.fleet.summary import summarize, targets


def _device(name: str, cohort: str, end_acc: float, lost: int = 0) -> DeviceResult:
    pts = []
    for i, t in enumerate([0, 10, 20, 30, 40, 50, 60]):
        domain = "night" if t < 30 else "cast"
        none, teacher, ceiling = (0.60, 0.90, 0.85) if domain == "night" else (0.70, 0.90, 0.80)
        acc = none + (end_acc - none) * (i % 3) / 2 if t not in (20, 60) else end_acc
        pts.append(Point(t_s=t, domain=domain, version=f"v{i}", accuracy=acc, none=none, teacher=teacher,
                         ceiling=ceiling, up_bytes=1000 * i, down_bytes=100 * i))  # fmt: skip
    return DeviceResult(
        device_id=name,
        group=name.split("-")[0],
        cohort=cohort,
        link={"up_mbps": 0.256, "loss": 0.02, "outages": [{"start_s": 5, "duration_s": 60}]},
        points=pts,
        updates=[
            UpdateApplied(t_s=12, version="v1", latencies_s=[3.0, 5.0]),
            UpdateApplied(t_s=40, version="v2", latencies_s=[7.0]),
        ],
        rollbacks=[Rollback(t_s=45, from_version="v2", to_version="v1", reason="confidence fell")],
        refused_candidates=1,
        published_updates=3,
        superseded_updates=1,
        samples=SampleCounts(frames=100, selected=30, acked=30, stored=30 - lost, lost=lost),
        up_bytes=6000,
        down_bytes=600,
        update_payload_bytes=300,
        send_all_bytes=60000,
        ask_ms=[10.0, 12.0, 30.0],
        upload_ack_ms=[50.0, 80.0],
        phases=[{"domain": "night", "start_s": 0, "end_s": 30}, {"domain": "cast", "start_s": 30, "end_s": 60}],
    )


@pytest.fixture
def result() -> FleetResult:
    devs = [_device("cam-00", "a", 0.84), _device("cam-01", "a", 0.81), _device("slow", "b", 0.75, lost=1)]
    return FleetResult(run="test-run", scenario={"name": "t", "duration_s": 60}, devices=devs,
                       facts={"fp32_adapter_bytes": 4000, "zoo": "micro"})  # fmt: skip


def test_summary_figures(result):
    s = summarize(result)
    # cam-00 night: (0.84 - 0.60) / 0.30 = 0.8; slow cast: (0.75 - 0.70) / 0.20 = 0.25 (the worst phase)
    night = [r for r in s["phases"] if r["device"] == "cam-00" and r["domain"] == "night"][0]
    assert night["recovery"] == pytest.approx(0.8)
    assert night["ceiling_recovery"] == pytest.approx(0.25 / 0.30)
    assert night["share_of_ceiling"] == pytest.approx(0.24 / 0.25)
    assert s["recovery_min"] == pytest.approx(0.25)
    assert s["share_of_ceiling_min"] == pytest.approx(0.05 / 0.10)  # slow on cast: 75 against a ceiling of 80
    assert s["uplink_ratio"] == pytest.approx(0.1)
    assert s["downlink_ratio"] == pytest.approx(1800 / (6 * 4000))
    assert s["update_latency_s"]["p50"] == pytest.approx(5.0)
    assert s["samples_lost"] == 1 and s["rollbacks"] == 3 and s["refused_candidates"] == 3
    assert s["worst_margin_vs_none"] == pytest.approx(0.0)
    met = {t["target"]: t["met"] for t in targets(s)}
    assert met["uplink <= 20% of send-everything"] is True
    assert s["update_payload_ratio"] == pytest.approx(900 / (6 * 4000))
    assert met["update payload <= 1/20 of the fp32 adapter"] is True
    assert met["recovery >= 65% of the gap on every shift with a gap >= 5 pt"] is False
    assert met["Tandem >= 90% of the true-label ceiling's gain on every scored shift"] is False
    assert met["0 acked samples lost"] is False
    assert met["memory per agent beyond shared weights <= 30 MB"] is None


def test_steps_with_a_gap_below_5_points_are_not_scored(result):
    for p in result.devices[2].points:
        if p.domain == "cast":
            p.teacher = p.none + 0.04  # slow's cast: a 4-point gap, within noise on a few hundred samples
    s = summarize(result)
    cast = [r for r in s["phases"] if r["device"] == "slow" and r["domain"] == "cast"][0]
    assert cast["recovery"] is None and cast["share_of_ceiling"] is None
    assert s["recovery_min"] == pytest.approx(0.5)  # now slow on night: (0.75 - 0.60) / 0.30
    assert s["share_of_ceiling_min"] == pytest.approx(0.15 / 0.25)  # slow on night: 75 against 85


def test_report_files(result, tmp_path):
    paths = write_report(result, tmp_path / "run")
    for name in ("accuracy", "bytes", "latency_cdf"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="accuracy.png"' not in page
    assert "cam-01" in page and "256 kbit/s, 2% loss, 1 outage(s)" in page
    assert "<th>share of ceiling</th>" in page
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["samples_lost"] == 1 and len(data["targets"]) == 8
    again = load_results(paths["json"])
    assert summarize(again) == summarize(result)


def test_console_summary(result):
    buf = io.StringIO()
    print_summary(result, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "cam-00" in text and "slow" in text and "targets" in text and "uplink <= 20%" in text


@pytest.fixture
def saved_figures(monkeypatch) -> dict[str, list[str]]:
    """File name -> titles of the visible panels of each figure the report saves (read from the figure itself)."""
    from matplotlib.figure import Figure

    saved: dict[str, list[str]] = {}
    real = Figure.savefig

    def savefig(fig, fname, *args, **kwargs):
        saved[Path(fname).stem] = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        return real(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def test_small_fleet_plots_a_panel_per_device(result, tmp_path, saved_figures):
    write_report(result, tmp_path)
    assert saved_figures["accuracy"] == ["cam-00", "cam-01", "slow"]


def test_large_fleet_plots_a_panel_per_group(tmp_path, saved_figures):
    devs = [_device(f"g{i % 3}-{i:02d}", "c", 0.8) for i in range(15)]
    res = FleetResult(run="big", scenario={"name": "big"}, devices=devs, facts={})
    write_report(res, tmp_path)
    assert saved_figures["accuracy"] == [f"g{g} (mean of 5)" for g in range(3)]
