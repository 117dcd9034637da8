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
    assert cloud.port == 0 and cloud.chunk_size == 1024 * 1024 and cloud.metrics_port == 9464
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
