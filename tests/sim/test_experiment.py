"""The offline experiment on untrained micro models: structure, bytes and reports (not accuracy)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from common.errors import ConfigError
from sim.experiment.cli import experiment_app
from sim.experiment.config import parse_overrides, sized


def test_tiny_offline_run_writes_reports_with_consistent_bytes(tmp_path):
    result = CliRunner().invoke(experiment_app, ["offline", "--size", "tiny", "--out", str(tmp_path), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "targets" in result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert "| rnd | shift |" in (tmp_path / "table.md").read_text()
    rows = data["rows"]
    arms = {r["arm"] for r in rows}
    assert arms == {"none", "teacher", "tandem", "ceiling", "tandem_fp32", "send_all", "ce_only"}
    cfg = data["config"]
    budget = data["facts"]["downlink_budget_bytes"]
    for r in rows:
        if r["arm"] == "tandem":
            assert 0 < r["uplink_samples"] <= cfg["uplink_samples_per_round"]
            assert 0 < r["downlink_bytes"] <= budget
        if r["arm"] == "send_all":
            assert r["uplink_samples"] == cfg["stream_per_round"]
        if r["arm"] == "ceiling":  # the same uploads as Tandem's, through the same DWC budget
            twin = next(t for t in rows if t["arm"] == "tandem" and t["round"] == r["round"])
            assert (r["uplink_bytes"], r["uplink_samples"]) == (twin["uplink_bytes"], twin["uplink_samples"])
            assert 0 < r["downlink_bytes"] <= budget
        if r["arm"] == "tandem_fp32":
            assert r["downlink_bytes"] >= data["facts"]["fp32_adapter_bytes"] * 0.99
        # The teacher's pseudo-answers are scored on every uploading arm; the all-token rescoring only on UTS.
        if r["arm"] in ("tandem", "send_all", "ce_only"):
            assert 0.0 <= r["label_accuracy"] <= 1.0
            assert (r["label_accuracy_all_tokens"] is not None) == (r["arm"] != "send_all")
        else:
            assert r["label_accuracy"] is None and r["label_accuracy_all_tokens"] is None
    table = (tmp_path / "table.md").read_text()
    assert "## Teacher pseudo-answers on the uploads" in table
    assert "| shift | none | Tandem (end) | ceiling (end) | teacher |" in table
    s = data["summary"]
    assert 0 < s["uplink_ratio"] < 0.5
    assert 0 < s["downlink_ratio"] <= budget / data["facts"]["fp32_adapter_bytes"] + 1e-9
    per = data["facts"]["uplink_per_sample"]
    assert per["tandem_bytes"] < per["send_all_bytes"]


def test_sizes_and_bad_settings():
    assert sized("quick").rounds_per_shift >= 1
    with pytest.raises(ConfigError, match="unknown experiment size"):
        sized("huge")
    with pytest.raises(ConfigError, match="unknown shift"):
        sized("tiny", shifts=["sepia"])
    with pytest.raises(ConfigError, match="invalid experiment settings"):
        sized("tiny", keep_ratio=0.0)
    with pytest.raises(ConfigError, match="dwc_selection: Input should be 'energy' or 'impact'$"):
        sized("tiny", dwc_selection="bogus")


def test_set_overrides_reach_the_config_and_bad_ones_are_refused():
    cfg = sized("tiny", **parse_overrides(["replay_rounds=1", "akd.lr=6e-3", "baselines=[ceiling]"]))
    assert (cfg.replay_rounds, cfg.akd.lr, cfg.baselines) == (1, 6e-3, ["ceiling"])
    assert cfg.akd.epochs == 1  # the size's other AKD settings stay
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_overrides(["replay_rounds"])
    with pytest.raises(ConfigError, match="only akd"):
        parse_overrides(["uts.keep=1"])
    with pytest.raises(ConfigError, match="invalid experiment settings: akd.lr"):
        sized("tiny", **parse_overrides(["akd.lr=-1"]))
