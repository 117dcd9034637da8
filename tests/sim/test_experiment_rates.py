"""The rate-recovery arms of the offline experiment on untrained micro models: bytes and reports (not accuracy)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from common.errors import ConfigError
from sim.experiment.cli import experiment_app
from sim.experiment.config import sized


def test_rate_arms_report_bytes_in_rate_order(tmp_path):
    args = ["offline", "--size", "tiny", "--out", str(tmp_path), "--threads", "1", "--rate-arms", "default",
            "--baselines", "none"]  # fmt: skip
    result = CliRunner().invoke(experiment_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    arms = data["rate_summary"]["arms"]
    assert set(arms) == {"uts_int8", "jpeg50", "jpeg90", "all_int8", "r32b4", "r32b3", "r16b4", "r8b4"}
    b = {k: v["payload_bytes_per_sample"] for k, v in arms.items()}
    assert b["r8b4"] < b["r16b4"] < b["r32b3"] < b["r32b4"] < b["uts_int8"] < b["all_int8"]
    assert b["jpeg50"] < b["jpeg90"]
    assert abs(b["jpeg90"] - data["facts"]["uplink_per_sample"]["jpeg_q90_bytes"]) < 0.25 * b["jpeg90"]
    for name, a in arms.items():  # the link adds the chunk's framing (digest, description) to every payload
        assert a["link_bytes_per_sample"] > a["payload_bytes_per_sample"], name
    assert {r["arm"] for r in data["rows"]} >= {"r8b4", "jpeg90", "all_int8"}
    assert "| r8b4 |" in (tmp_path / "rate_recovery.md").read_text()
    assert (tmp_path / "rate_recovery.png").stat().st_size > 1000


def test_unknown_rate_arm_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown rate arm 'r0bx'"):
        sized("tiny", rate_arms=["r0bx"])
