"""A short fleet run in the default suite (micro zoo, the runner's public entry point): one agent under a night
shift uplinks, the real cloud trains on its samples, and the update reaches the agent and is applied. Judged from
what the run reports (results.json), not from the harness' internals."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sim.fleet.report import write_report
from sim.fleet.runner import FleetRunner, RunOptions
from sim.fleet.scenario import load_scenario


def _scenario(tmp_path: Path) -> Path:
    data = {
        "cloud": {"adaptation": {"executor": "inprocess", "trigger": {"min_samples": 8}}},
        "name": "micro-update",
        "duration_s": 30,
        "zoo": "micro",
        "measure_every_s": 5,
        "eval_samples": 16,
        "groups": [
            {"name": "cam", "link": "wifi", "request_rate_hz": 8, "uplink_budget": {"budget": 40, "period_s": 5},
             "drift": [{"at_s": 0, "domain": "night"}]},
        ],
    }  # fmt: skip
    path = tmp_path / "micro-update.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_update_reaches_an_agent_and_is_applied(tmp_path):
    runner = FleetRunner(
        load_scenario(_scenario(tmp_path)), RunOptions(out_dir=tmp_path / "reports", run_name="r", drain_s=5)
    )
    paths = write_report(runner.run(), runner.run_dir())
    data = json.loads(paths["json"].read_text())
    summary, (device,) = data["summary"], data["devices"]
    assert summary["samples_acked"] >= 8 and summary["samples_lost"] == 0  # enough uplinked to trigger a job
    assert summary["updates_published"] >= 1 and summary["updates_applied"] >= 1
    assert device["updates"][0]["version"] == "v1" and summary["update_latency_count"] >= 1
    assert device["points"][-1]["version"] != "v0"  # the last measurement ran on an update's adapter
