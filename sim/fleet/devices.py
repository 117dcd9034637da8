"""One simulated device as the harness holds it: its link emulator, registration, agent (a tenant of the one
shared device model, with its own adapter), world source and probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.agent import AgentConfig, DeviceAgent
from device.agent.batcher import ComputeModel
from device.agent.shared_batcher import SharedBatcher
from device.transport.enroll import register_device
from sim.fleet.probe import DeviceProbe
from sim.fleet.results import Point
from sim.fleet.scenario import DeviceSpec
from sim.fleet.world_source import WorldSource
from sim.link import LinkConfig, LinkProxy
from sim.world import World

MODEL_FAMILY = "tandem-zoo"
REGISTER_GIVE_UP_S = 300.0


def _bytes_per_s(mbps: float | None) -> int:
    return 0 if mbps is None else int(LinkConfig.mbps_to_bytes_per_s(mbps) or 0)


def agent_config(spec: DeviceSpec, state_dir: Path, gateway: str, overrides: dict[str, Any]) -> AgentConfig:
    """The agent's config for one simulated device: its identity, link, UTS budget; no local API or metrics
    port (a fleet of agents in one process would fight over them)."""
    from device.agent import load_agent_config

    b = spec.uplink_budget
    expected = max(1, int(spec.request_rate_hz * b.period_s))
    data: dict[str, Any] = {
        "transport.gateway": gateway,
        "transport.state_dir": str(state_dir),
        "transport.device_id": spec.device_id,
        "transport.cohort": spec.cohort,
        "transport.model_family": MODEL_FAMILY,
        "api.listen": "",
        "metrics.port": None,
        "uts.period_s": b.period_s,
        "uts.gate.unit": b.unit,
        "uts.gate.budget": b.budget,
        "uts.gate.expected_arrivals": expected,
        "link.uplink_bytes_per_s": _bytes_per_s(spec.link.up_mbps),
        "link.downlink_bytes_per_s": _bytes_per_s(spec.link.down_mbps),
        "log_json": False,
    }
    data.update(_flatten(overrides))
    cfg = load_agent_config(None, {k: v for k, v in data.items() if v is not None})
    if overrides.get("metrics", {}).get("port") is None:
        cfg.metrics.port = None
    return cfg


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class SimDevice:
    """Everything the harness runs and records for one device."""

    spec: DeviceSpec
    proxy: LinkProxy
    agent: DeviceAgent
    source: WorldSource
    probe: DeviceProbe
    points: list[Point] = field(default_factory=list)

    @classmethod
    async def create(
        cls,
        spec: DeviceSpec,
        run_dir: Path,
        gateway: tuple[str, int],
        pool: SharedBatcher,
        world: World,
        overrides: dict[str, Any],
        compute_model: ComputeModel | None = None,
    ) -> SimDevice:
        """Link up, register (as ``tandem-device register`` does, retrying a slow link's timeouts), and build
        the agent as a tenant of the pool's shared model, served by the pool's one batcher (each agent's rows
        with its own adapter), its answers paced by ``compute_model``."""
        proxy = LinkProxy(gateway[0], gateway[1], spec.link)
        await proxy.start()
        cfg = agent_config(spec, run_dir / "devices" / spec.device_id, proxy.address, overrides)
        await register_device(cfg.transport, give_up_after_s=REGISTER_GIVE_UP_S)
        model = pool.tenants.tenant(spec.device_id)
        agent = DeviceAgent(cfg, model, compute_model=compute_model, shared_batcher=pool)
        source = WorldSource(spec, world)
        probe = DeviceProbe(source)
        agent.subscribe(probe)
        agent.add_source(source, source.interval_s())
        return cls(spec, proxy, agent, source, probe)

    def start_clock(self, epoch: float) -> None:
        """Time 0 of the drift schedule and of the link's outages and trace."""
        self.proxy.set_epoch(epoch)
        self.source.set_start(epoch)
