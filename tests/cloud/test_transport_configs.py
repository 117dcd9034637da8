"""The example configs in deploy/configs load, and bad values are one-line ConfigErrors."""

from __future__ import annotations

import pytest
from transport_support import REPO_ROOT

from cloud.config import GatewayConfig
from common.config import load_config
from common.errors import ConfigError
from device.agent.config import load_agent_config
from sim.link import LinkConfig


def test_example_configs_load():
    cloud = load_config(GatewayConfig, REPO_ROOT / "deploy/configs/cloud.yaml", port=0)
    assert cloud.port == 0 and cloud.chunk_size == 1024 * 1024
    device = load_agent_config(REPO_ROOT / "deploy/configs/device.yaml").transport
    assert device.device_id == "jetson-0001" and device.tls is None


def test_bad_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(GatewayConfig, None, chunk_size=4 * 1024 * 1024, max_message_bytes=4 * 1024 * 1024)
    with pytest.raises(ConfigError, match="unknown_key"):
        bad = tmp_path / "c.yaml"
        bad.write_text("unknown_key: 1\n")
        load_config(GatewayConfig, bad)
    with pytest.raises(ConfigError, match="up_mbps"):
        load_config(LinkConfig, None, up_mbps=-1)


def test_shipped_cloud_config_is_closed_quiet_and_keeps_its_key_in_the_data_dir(tmp_path):
    cloud = load_config(GatewayConfig, REPO_ROOT / "deploy/configs/cloud.yaml", data_dir=tmp_path / "d")
    assert cloud.signing_key_path == tmp_path / "d" / "keys" / "cloud_ed25519.pem"
    assert cloud.metrics_port is None  # docs/transport.md: metrics are off by default
    assert not cloud.open_enrollment and cloud.enrollment_secret is None
    assert GatewayConfig().open_enrollment is False  # closed without a config file too


def test_tandem_cloud_set_overrides_any_field_and_a_bad_one_is_one_line(tmp_path):
    import subprocess
    import sys

    from common.config import parse_assignments

    sets = parse_assignments(["open_enrollment=true", "adaptation.stop_grace_s=3", "adaptation.ray.learners=4"])
    cfg = load_config(GatewayConfig, REPO_ROOT / "deploy/configs/cloud.yaml", sets, port=0)
    assert cfg.open_enrollment and cfg.adaptation.stop_grace_s == 3.0 and cfg.adaptation.ray.learners == 4
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--data-dir", str(tmp_path), "--set", "adaptation.bogus=1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "adaptation.bogus" in lines[0], proc.stderr
