"""Device and cloud profiles (``sim/profiles/*.yaml``): the hardware the simulator's virtual time models.

A device profile says how long a batch of frames takes on the modelled device; a cloud profile how long an
adaptation job takes on the modelled cluster. The ``host`` profiles keep what this machine measured instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from common.config import StrictConfig, read_yaml_mapping
from common.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_DEVICE_PROFILE = "jetson-agx-orin"
DEFAULT_CLOUD_PROFILE = "a100-x1"


class DeviceProfile(StrictConfig):
    """Seconds a batch of ``n`` frames takes: ``fixed_ms + n * per_frame_ms`` (or the host's own time)."""

    name: str = ""
    description: str = ""
    fixed_ms: float = Field(0.0, ge=0)
    per_frame_ms: float = Field(0.0, ge=0)
    host: bool = False

    def batch_seconds(self, frames: int, measured_s: float) -> float:
        if self.host:
            return measured_s
        return (self.fixed_ms + frames * self.per_frame_ms) / 1000.0


class CloudProfile(StrictConfig):
    """The modelled training cluster (``cloud.config.SimulationConfig`` without the clock file)."""

    name: str = ""
    description: str = ""
    gpus: int = Field(1, ge=1)
    job_overhead_s: float = Field(10.0, ge=0)
    teacher_samples_per_s: float = Field(20.0, gt=0)
    learner_samples_per_s: float = Field(8.0, gt=0)
    host: bool = False

    def simulation(self, clock_file: Path) -> dict[str, Any]:
        """The cloud service's ``simulation`` config section for this profile."""
        fields = self.model_dump(exclude={"name", "description"})
        return {"clock_file": str(clock_file), **fields}


def _load(kind: str, name: str | dict[str, Any], model: type[StrictConfig]):
    path = PROFILE_DIR / f"{kind}.yaml"
    if isinstance(name, dict):  # a scenario's own figures
        try:
            return model.model_validate({"name": "custom", **name})
        except ValidationError as exc:
            raise ConfigError(f"{kind[:-1]} profile: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    table = read_yaml_mapping(path)
    if name not in table:
        raise ConfigError(f"unknown {kind[:-1]} profile {name!r} (known: {', '.join(sorted(table))})")
    try:
        return model.model_validate({"name": name, **table[name]})
    except ValidationError as exc:
        raise ConfigError(f"{path}: profile {name}: {exc.errors()[0]['msg']}") from None


def device_profile(name: str | dict[str, Any]) -> DeviceProfile:
    return _load("devices", name, DeviceProfile)


def cloud_profile(name: str | dict[str, Any]) -> CloudProfile:
    return _load("clouds", name, CloudProfile)


def profile_names(kind: str) -> list[str]:
    """The names in ``sim/profiles/<kind>.yaml`` (``devices`` or ``clouds``)."""
    return sorted(read_yaml_mapping(PROFILE_DIR / f"{kind}.yaml"))
