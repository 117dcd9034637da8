"""Scenario files: a fleet of devices (groups or single devices), each with a drift schedule, request rate,
uplink budget, cohort and link profile; the run's duration and seeds. Loaded from YAML, validated by pydantic;
every mistake is one line naming the file and the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import StrictConfig
from common.errors import ConfigError
from sim.fleet.drift import DriftSchedule, DriftStep
from sim.fleet.profiles import DEFAULT_CLOUD_PROFILE, DEFAULT_DEVICE_PROFILE, cloud_profile, device_profile
from sim.link import LinkConfig
from sim.link.presets import preset_fields

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
STREAM_STRIDE = 1_000_000
"""World sample indices per device: device ``k`` streams samples ``k * STREAM_STRIDE + n``."""
HELD_OUT_OFFSET = 1_000_000_000
"""World sample indices of the held-out sets (never streamed)."""


class UplinkBudget(StrictConfig):
    """What UTS may send per period: samples or bytes."""

    unit: Literal["samples", "bytes"] = "samples"
    budget: float = Field(gt=0)
    period_s: float = Field(60.0, gt=0)


def _link(value: Any) -> Any:
    """``lte`` or ``{preset: lte, loss: 0.02, ...}`` or plain LinkConfig fields -> LinkConfig fields."""
    if isinstance(value, LinkConfig):
        return value
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ValueError("link must be a preset name or a mapping of link fields")
    fields = dict(value)
    preset = fields.pop("preset", None)
    if preset is not None:
        try:
            base = preset_fields(str(preset))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        fields = {**base, **fields}
    return fields


class DeviceGroup(StrictConfig):
    """``count`` devices alike (ids ``name-00``, ``name-01``, ...; a single device keeps ``name``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    count: int = Field(1, ge=1, le=1000)
    cohort: str = ""
    link: LinkConfig = LinkConfig()
    request_rate_hz: float = Field(2.0, gt=0, le=1000)
    uplink_budget: UplinkBudget = UplinkBudget(budget=32, period_s=60)
    drift: list[DriftStep] = Field(min_length=1)
    seed: int = 0
    """Added to the scenario's seed for this group's links."""

    @field_validator("link", mode="before")
    @classmethod
    def _parse_link(cls, value: Any) -> Any:
        return _link(value)

    @field_validator("drift")
    @classmethod
    def _starts_at_zero(cls, steps: list[DriftStep]) -> list[DriftStep]:
        first = min(s.at_s for s in steps)
        if first != 0:
            raise ValueError(f"the first drift step must start at 0 s, got {first:g}")
        return steps


class Scenario(StrictConfig):
    """One fleet run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    duration_s: float = Field(gt=0)
    seed: int = 0
    zoo: str = "reference"
    """``reference`` (the shipped zoo), ``micro`` (built in seconds; tests), ``llava-1.5-7b-shape`` (real geometry,
    random weights) or a directory with teacher/, device/."""
    measure_every_s: float = Field(10.0, gt=0)
    """How often each device's accuracy, version and bytes are sampled."""
    eval_samples: int = Field(200, ge=4)
    """Held-out samples per domain for the accuracy curves."""
    severity_step: float = Field(0.1, gt=0, le=1)
    """Severities during a ramp are rounded to this step (each distinct domain is evaluated once)."""
    cloud: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the cloud service's config (checked against it when the run starts)."""
    agent: dict[str, Any] = Field(default_factory=dict)
    """Overrides of every device agent's config (checked against it when the run starts)."""
    device_profile: str | dict[str, Any] = DEFAULT_DEVICE_PROFILE
    """The modelled device hardware: a name in ``sim/profiles/devices.yaml`` or the figures themselves."""
    cloud_profile: str | dict[str, Any] = DEFAULT_CLOUD_PROFILE
    """The modelled training cluster: a name in ``sim/profiles/clouds.yaml`` or the figures themselves."""
    groups: list[DeviceGroup] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> Scenario:
        seen: set[str] = set()
        for g in self.groups:
            if g.name in seen:
                raise ValueError(f"group name {g.name!r} is used twice")
            seen.add(g.name)
        return self

    def devices(self) -> list[DeviceSpec]:
        """Every device of the scenario, in order, with its own seeds and stream."""
        out: list[DeviceSpec] = []
        for g in self.groups:
            for i in range(g.count):
                index = len(out)
                device_id = g.name if g.count == 1 else f"{g.name}-{i:02d}"
                link = g.link.model_copy(update={"seed": self.seed + g.seed + index})
                drift = DriftSchedule(g.drift, self.severity_step)
                out.append(
                    DeviceSpec(device_id, index, g.name, g.cohort, link, g.request_rate_hz, g.uplink_budget, drift)
                )
        return out


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device as the harness runs it."""

    device_id: str
    index: int
    group: str
    cohort: str
    link: LinkConfig
    request_rate_hz: float
    uplink_budget: UplinkBudget
    drift: DriftSchedule

    @property
    def stream_offset(self) -> int:
        """First world index of this device's stream."""
        return self.index * STREAM_STRIDE


def resolve_scenario_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a scenario in the library (``sim/scenarios/<name>.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    lib = SCENARIO_DIR / f"{name_or_path}.yaml"
    if lib.is_file():
        return lib
    known = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.yaml")))
    raise ConfigError(f"scenario not found: {name_or_path} (not a file, nor one of: {known})")


def _resolve_traces(data: dict, base: Path) -> None:
    """Trace paths in a scenario are relative to the scenario file."""
    for g in data.get("groups") or []:
        link = g.get("link") if isinstance(g, dict) else None
        if isinstance(link, dict) and isinstance(link.get("trace"), str) and not Path(link["trace"]).is_absolute():
            link["trace"] = str((base / link["trace"]).resolve())


def _one_line(exc: ValidationError) -> str:
    """Validation errors as ``field: reason`` parts; unknown keys say so plainly."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_scenario(name_or_path: str | Path, **overrides: Any) -> Scenario:
    """Load and validate a scenario; ConfigError with one line naming the file and the bad field."""
    path = resolve_scenario_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        reason = str(exc).replace("\n", " ")
        raise ConfigError(f"scenario {path} is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"scenario {path} must hold a mapping at the top level")
    _resolve_traces(data, path.parent)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"scenario {path}: {_one_line(exc)}") from None
    device_profile(scenario.device_profile)  # an unknown profile fails now, naming the known ones
    cloud_profile(scenario.cloud_profile)
    for g in scenario.groups:
        if g.link.trace is not None:
            from sim.link.trace import LinkTrace

            LinkTrace.load(g.link.trace)  # a bad trace fails now, naming its file and line
    return scenario
