"""Scenario files: the library loads; mistakes are one clear line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError
from sim.fleet.drift import DriftSchedule, DriftStep
from sim.fleet.scenario import SCENARIO_DIR, load_scenario

GOOD = {
    "name": "t",
    "duration_s": 60,
    "groups": [
        {"name": "cam", "count": 2, "cohort": "a", "link": "lte", "drift": [{"at_s": 0, "domain": "night"}]},
        {"name": "slow", "link": {"preset": "3g", "loss": 0.02, "outages": [{"start_s": 5, "duration_s": 10}]},
         "drift": [{"at_s": 0, "domain": "clear"}, {"at_s": 10, "domain": "cast", "ramp_s": 10}]},
    ],
}  # fmt: skip


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _error(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_scenario(_write(tmp_path, data))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_library_scenarios_load():
    names = {p.stem for p in SCENARIO_DIR.glob("*.yaml")}
    assert {"single-three-shifts", "mixed-fleet", "scale-100", "demo", "composite-shift"} <= names
    counts = {n: len(load_scenario(n).devices()) for n in names}
    assert counts["single-three-shifts"] == 1 and counts["mixed-fleet"] == 20 and counts["scale-100"] == 100
    assert counts["demo"] == 3
    mixed = load_scenario("mixed-fleet")
    assert len({d.cohort for d in mixed.devices()}) == 3
    slow = [d for d in mixed.devices() if d.link.up_mbps == 0.256]
    assert len(slow) == 1 and slow[0].link.loss == 0.02 and slow[0].link.outages[0].duration_s == 60
    traced = [d for d in mixed.devices() if d.link.trace is not None]
    assert len(traced) == 1 and traced[0].link.trace.is_file()


def test_devices_expand_with_ids_presets_and_seeds(tmp_path):
    sc = load_scenario(_write(tmp_path, GOOD))
    devs = sc.devices()
    assert [d.device_id for d in devs] == ["cam-00", "cam-01", "slow"]
    assert devs[0].link.up_mbps == 10.0 and devs[0].link.latency_ms == 35.0  # the lte preset
    assert devs[2].link.up_mbps == 0.384 and devs[2].link.loss == 0.02  # 3g preset, loss overridden
    assert len({d.link.seed for d in devs}) == 3
    assert len({d.stream_offset for d in devs}) == 3


def test_unknown_key_is_named(tmp_path):
    bad = {**GOOD, "groups": [{**GOOD["groups"][0], "colour": "red"}]}
    msg = _error(tmp_path, bad)
    assert "unknown key 'groups.0.colour'" in msg and "s.yaml" in msg
    assert "unknown key 'durration_s'" in _error(tmp_path, {**GOOD, "durration_s": 3})
    bad_link = {**GOOD, "groups": [{**GOOD["groups"][0], "link": {"preset": "lte", "losss": 0.1}}]}
    assert "unknown key 'groups.0.link.losss'" in _error(tmp_path, bad_link)


def test_bad_domain_and_preset(tmp_path):
    bad = {**GOOD, "groups": [{**GOOD["groups"][0], "drift": [{"at_s": 0, "domain": "nigth"}]}]}
    msg = _error(tmp_path, bad)
    assert "groups.0.drift.0.domain" in msg and "unknown shift 'nigth'" in msg
    bad = {**GOOD, "groups": [{**GOOD["groups"][0], "drift": [{"at_s": 0, "domain": "fog:1.5"}]}]}
    assert "must be in [0, 1]" in _error(tmp_path, bad)
    bad = {**GOOD, "groups": [{**GOOD["groups"][0], "link": "5g"}]}
    msg = _error(tmp_path, bad)
    assert "unknown link preset '5g'; known: wifi, lte, 3g, satellite" in msg


def test_other_mistakes(tmp_path):
    late = {**GOOD, "groups": [{**GOOD["groups"][0], "drift": [{"at_s": 5, "domain": "night"}]}]}
    assert "first drift step must start at 0" in _error(tmp_path, late)
    twice = {**GOOD, "groups": [GOOD["groups"][0], GOOD["groups"][0]]}
    assert "used twice" in _error(tmp_path, twice)
    assert "duration_s" in _error(tmp_path, {**GOOD, "duration_s": -1})
    (tmp_path / "x.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="scenario not found: nope .*demo"):
        load_scenario("nope")
    traced = {**GOOD, "groups": [{**GOOD["groups"][0], "link": {"trace": "missing.csv"}}]}
    assert "link trace not found" in _error(tmp_path, traced)


def test_drift_ramps_and_phases():
    sched = DriftSchedule(
        [DriftStep(at_s=0, domain="clear"), DriftStep(at_s=10, domain="night", ramp_s=10),
         DriftStep(at_s=30, domain="cast", ramp_s=10)],
        severity_step=0.1,
    )  # fmt: skip
    assert sched.domain_at(5) == "clear"
    assert sched.domain_at(10) == "clear"  # severity 0 at the ramp's start
    assert sched.domain_at(15) == "night:0.5"
    assert sched.domain_at(22) == "night"
    assert sched.domain_at(32.5) == "night:0.8+cast:0.2"  # severities rounded to the 0.1 step
    assert sched.domain_at(100) == "cast"
    assert sched.phase_at(25) == 1 and sched.phase_end(1, 60) == 30 and sched.phase_end(2, 60) == 60


def test_the_cloud_labels_with_the_agents_answer_length(tmp_path):
    from sim.fleet.cloud_settings import cloud_settings
    from sim.fleet.devices import MODEL_FAMILY
    from sim.fleet.zoo import FleetZoo

    zoo = FleetZoo("z", tmp_path / "teacher", tmp_path / "device")
    family = cloud_settings(zoo, {}, {"model": {"max_new_tokens": 4}})["adaptation"]["families"][MODEL_FAMILY]
    assert family["max_new_tokens"] == 4
    assert "max_new_tokens" not in cloud_settings(zoo, {}, {})["adaptation"]["families"][MODEL_FAMILY]
    shape = load_scenario("llava-7b-shape")  # the shape scenario triggers jobs at its few uploads
    assert shape.cloud["adaptation"]["trigger"]["min_samples"] <= 4
