"""The example configs in deploy/configs load, and bad values are one-line ConfigErrors."""

from __future__ import annotations

import pytest
from transport_support import REPO_ROOT

from cloud.config import GatewayConfig
from common.config import load_config
from common.errors import ConfigError
from device.transport.config import DeviceClientConfig
from sim.link import LinkConfig


def test_example_configs_load():
    cloud = load_config(GatewayConfig, REPO_ROOT / "deploy/configs/cloud.yaml", port=0)
    assert cloud.port == 0 and cloud.chunk_size == 1024 * 1024
    device = load_config(DeviceClientConfig, REPO_ROOT / "deploy/configs/device.yaml")
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
