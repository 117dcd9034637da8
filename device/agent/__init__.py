"""The device agent: the long-running device role (``tandem-device run``) and its network-free per-frame step."""

from device.agent.agent import DeviceAgent
from device.agent.config import AgentConfig, load_agent_config
from device.agent.guard import GuardDecision, RegressionGuard
from device.agent.runtime import DeviceModel, ForwardOut
from device.agent.sources import CameraSource, DirectorySource, Source
from device.agent.step import Answer, DeviceStep, Frame
from device.agent.store import AdapterState, AdapterStore

__all__ = [
    "AdapterState",
    "AdapterStore",
    "AgentConfig",
    "Answer",
    "CameraSource",
    "DeviceAgent",
    "DeviceModel",
    "DeviceStep",
    "DirectorySource",
    "ForwardOut",
    "Frame",
    "GuardDecision",
    "RegressionGuard",
    "Source",
    "load_agent_config",
]
