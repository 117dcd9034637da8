"""Virtual time makes a fleet report a function of the scenario: the same micro scenario run twice, once with a
CPU-burning thread and process beside it, gives the same updates and the same accuracy curve. The idle run's
report (results.json) also shows what the default suite needs to see of a fleet run: uploads triggered a job in
the real cloud, and its update reached every agent, which applied it and measured on it."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import yaml

from sim.fleet.report import write_report
from sim.fleet.runner import FleetRunner, RunOptions
from sim.fleet.scenario import load_scenario
from sim.fleet.summary import summarize

DURATION_S = 24.0


def _scenario(tmp_path: Path) -> Path:
    data = {
        "name": "micro-virtual",
        "duration_s": DURATION_S,
        "zoo": "micro",
        "measure_every_s": 6,
        "eval_samples": 32,
        "cloud": {"adaptation": {"executor": "inprocess", "trigger": {"min_samples": 8}}},
        "device_profile": {"fixed_ms": 40, "per_frame_ms": 20},
        "cloud_profile": {"gpus": 1, "job_overhead_s": 2, "teacher_samples_per_s": 100, "learner_samples_per_s": 50},
        "groups": [
            {"name": "wifi", "cohort": "a", "link": "wifi", "request_rate_hz": 4,
             "uplink_budget": {"budget": 12, "period_s": 5}, "drift": [{"at_s": 0, "domain": "night"}]},
            {"name": "slow", "cohort": "b", "request_rate_hz": 4, "uplink_budget": {"budget": 12, "period_s": 5},
             "link": {"up_mbps": 0.256, "down_mbps": 0.256, "latency_ms": 80},
             "drift": [{"at_s": 0, "domain": "night"}]},
        ],
    }  # fmt: skip
    p = tmp_path / "micro-virtual.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1_000_003


def _run(tmp_path: Path, name: str, busy: bool):
    sc = load_scenario(_scenario(tmp_path))
    options = RunOptions(out_dir=tmp_path / "reports", run_name=name, drain_s=6, ceiling=False)
    runner = FleetRunner(sc, options)
    stop_thread, stop_proc = threading.Event(), multiprocessing.Event()
    burners = []
    if busy:
        burners = [threading.Thread(target=_burn, args=(stop_thread,), daemon=True),
                   multiprocessing.Process(target=_burn, args=(stop_proc,), daemon=True)]  # fmt: skip
        for b in burners:
            b.start()
    started = time.perf_counter()
    try:
        result = runner.run()
    finally:
        stop_thread.set()
        stop_proc.set()
        for b in burners:
            b.join(10)
    return result, time.perf_counter() - started, runner.run_dir()


def _check_report(result, run_dir: Path) -> None:
    """What a user reads: samples acked and none lost, an update published, applied by every agent, measured on."""
    data = json.loads(write_report(result, run_dir)["json"].read_text())
    summary = data["summary"]
    assert summary["samples_acked"] >= 8 and summary["samples_lost"] == 0  # enough uplinked to trigger a job
    assert summary["updates_published"] >= 1 and summary["update_latency_count"] >= 1
    for device in data["devices"]:
        assert device["updates"][0]["version"] == "v1", device["device_id"]
        assert device["points"][-1]["version"] != "v0"  # the last measurement ran on an update's adapter


def test_same_scenario_same_report_whatever_the_load(tmp_path):
    idle, idle_wall, idle_dir = _run(tmp_path, "idle", busy=False)
    _check_report(idle, idle_dir)
    busy, busy_wall, _ = _run(tmp_path, "busy", busy=True)
    for result in (idle, busy):
        assert result.facts["clock"] == "virtual"
        assert result.facts["lockstep"]["safety_timeouts"] == 0
        s = summarize(result)
        assert s["samples_lost"] == 0 and s["updates_applied"] >= 2  # updates reached and were applied
    for a, b in zip(idle.devices, busy.devices, strict=True):
        assert a.device_id == b.device_id
        applied_a, applied_b = len(a.updates), len(b.updates)
        assert applied_a >= 1, f"{a.device_id}: no update applied"
        assert abs(applied_a - applied_b) <= 1, (a.device_id, applied_a, applied_b)
        assert [p.t_s for p in a.points] == [p.t_s for p in b.points]  # measured at the same virtual moments
        for pa, pb in zip(a.points, b.points, strict=True):
            assert abs(pa.accuracy - pb.accuracy) <= 0.07, (a.device_id, pa.t_s, pa.accuracy, pb.accuracy)
        # Latencies are the modelled hardware's: the profile's 40 + 20 ms per frame, whatever the host did.
        assert min(min(a.ask_ms), min(b.ask_ms)) >= 60.0 - 1e-6
        assert max(max(a.ask_ms), max(b.ask_ms)) < 1000.0
    print(f"idle run {idle_wall:.0f} s wall, busy run {busy_wall:.0f} s wall")
