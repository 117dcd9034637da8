"""End to end on the micro zoo: the real cloud service (a child process), two real agents behind emulated links
(one slow and lossy, with an outage), the world as their source, then the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sim.fleet.report import write_report
from sim.fleet.runner import FleetRunner, RunOptions
from sim.fleet.scenario import load_scenario
from sim.fleet.summary import summarize

ROOT = Path(__file__).resolve().parents[2]


def _scenario(tmp_path: Path, duration: float, outage_at: float, executor: str) -> Path:
    data = {
        "cloud": {"adaptation": {"executor": executor, "trigger": {"min_samples": 8}}},
        "name": "micro-pair",
        "duration_s": duration,
        "zoo": "micro",
        "measure_every_s": max(2.0, duration / 4),
        "eval_samples": 16,
        "groups": [
            {"name": "fast", "cohort": "a", "link": "wifi", "request_rate_hz": 4,
             "uplink_budget": {"budget": 12, "period_s": 5}, "drift": [{"at_s": 0, "domain": "night"}]},
            {"name": "slow", "cohort": "a", "request_rate_hz": 4, "uplink_budget": {"budget": 12, "period_s": 5},
             "link": {"up_mbps": 0.256, "down_mbps": 0.256, "latency_ms": 80, "loss": 0.02,
                      "outages": [{"start_s": outage_at, "duration_s": 3}]},
             "drift": [{"at_s": 0, "domain": "clear"}, {"at_s": duration / 2, "domain": "cast", "ramp_s": 2}]},
        ],
    }  # fmt: skip
    p = tmp_path / "micro-pair.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _check(result) -> None:
    s = summarize(result)
    assert s["devices"] == 2 and s["frames"] > 20
    assert s["samples_acked"] > 0 and s["samples_lost"] == 0
    for d in result.devices:
        assert d.up_bytes > 0 and d.down_bytes > 0
        assert len(d.points) >= 2 and all(0 <= p.accuracy <= 1 for p in d.points)
        assert d.samples.acked + d.samples.pending == d.samples.selected
        assert d.samples.stored >= d.samples.acked
    # The true-label ceiling was replayed from the cloud's jobs and scored on every point.
    assert "ceiling_error" not in result.facts and result.facts["ceiling_s"] > 0
    assert all(p.ceiling is not None and 0 <= p.ceiling <= 1 for d in result.devices for p in d.points)
    slow = next(d for d in result.devices if d.device_id == "slow")
    assert slow.link_stats["cuts"] + slow.link_stats["refused"] >= 1  # the outage happened on its link
    assert {p.domain for p in slow.points} & {"clear", "cast"}


def test_fleet_runs_two_agents_in_process_on_the_wall_clock(tmp_path):
    """The fast variant (make test): the runner in this process, 10 s of scenario, ``--realtime`` (virtual time
    has its own test, tests/sim/test_fleet_virtual_time.py)."""
    sc = load_scenario(_scenario(tmp_path, duration=10, outage_at=2, executor="inprocess"))
    runner = FleetRunner(sc, RunOptions(out_dir=tmp_path / "reports", run_name="r", drain_s=8, realtime=True))
    result = runner.run()
    _check(result)
    assert result.facts["clock"] == "wall" and "lockstep" not in result.facts
    assert result.facts["cloud_jobs"] is not None  # the cloud's job store was read (jobs need a warm trainer)
    paths = write_report(result, runner.run_dir())
    assert paths["html"].stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fleet_cli_run_and_report(tmp_path):
    """`tandem-sim fleet run` as a user runs it (the trainer on a local Ray): 60 s, updates reach the devices, then
    `fleet report` rebuilds the page from results.json."""
    scenario = _scenario(tmp_path, duration=60, outage_at=10, executor="ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sim.cli", "fleet", "run", str(scenario), "--out", str(tmp_path), "--name", "cli"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report:" in done.stdout and "targets" in done.stdout
    run_dir = tmp_path / "cli"
    data = json.loads((run_dir / "results.json").read_text())
    assert data["summary"]["samples_lost"] == 0 and len(data["devices"]) == 2
    assert data["summary"]["updates_applied"] >= 1 and data["summary"]["update_latency_count"] >= 1
    (run_dir / "index.html").unlink()
    again = subprocess.run([sys.executable, "-m", "sim.cli", "fleet", "report", str(run_dir / "results.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and (run_dir / "index.html").is_file()


def test_fleet_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nduration_s: 5\ngroups: [{name: a, link: 5g, drift: [{at_s: 0, domain: clear}]}]\n")
    for args in (["fleet", "run", str(bad)], ["fleet", "run", "no-such-scenario"], ["fleet", "report", "nope.json"]):
        done = subprocess.run(
            [sys.executable, "-m", "sim.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 1
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
