"""A device's drift schedule: which domain (shifts and severities) its camera sees at time t."""

from __future__ import annotations

from pydantic import Field, field_validator

from common.config import StrictConfig
from common.errors import ConfigError
from sim.world import Domain, parse_domain
from sim.world.shifts import ShiftSpec


class DriftStep(StrictConfig):
    """From ``at_s`` on, the world shows ``domain``; over the first ``ramp_s`` seconds it blends in from the
    previous step's domain (the new shifts' severities rise from 0, the old ones fall to 0)."""

    at_s: float = Field(ge=0)
    domain: str
    ramp_s: float = Field(0.0, ge=0)

    @field_validator("domain")
    @classmethod
    def _known_domain(cls, value: str) -> str:
        try:
            return parse_domain(value).name
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def _scaled(domain: Domain, factor: float) -> list[ShiftSpec]:
    return [ShiftSpec(s.name, s.severity * factor) for s in domain.shifts]


def _quantized(shifts: list[ShiftSpec], step: float) -> Domain:
    """Merge repeated shifts (severities add, capped at 1) and round severities to ``step``; zeros vanish."""
    merged: dict[str, float] = {}
    for s in shifts:
        merged[s.name] = min(1.0, merged.get(s.name, 0.0) + s.severity)
    out = []
    for name, sev in merged.items():
        q = round(round(sev / step) * step, 6) if step > 0 else sev
        if q > 0:
            out.append(ShiftSpec(name, min(1.0, q)))
    return Domain(tuple(out))


class DriftSchedule:
    """Steps sorted by time; the first starts at 0."""

    def __init__(self, steps: list[DriftStep], severity_step: float = 0.1) -> None:
        if not steps:
            raise ConfigError("a drift schedule needs at least one step")
        self.steps = sorted(steps, key=lambda s: s.at_s)
        if self.steps[0].at_s != 0:
            raise ConfigError(f"the first drift step must start at 0 s, got {self.steps[0].at_s:g}")
        self.severity_step = severity_step

    def domain_at(self, t_s: float) -> str:
        """The domain's name at ``t_s`` (severities rounded to the schedule's step during ramps)."""
        k = 0
        for i, step in enumerate(self.steps):
            if step.at_s <= t_s:
                k = i
        step = self.steps[k]
        new = parse_domain(step.domain)
        if step.ramp_s <= 0 or t_s >= step.at_s + step.ramp_s:
            return new.name
        f = (t_s - step.at_s) / step.ramp_s
        old = parse_domain(self.steps[k - 1].domain) if k > 0 else Domain()
        return _quantized(_scaled(old, 1 - f) + _scaled(new, f), self.severity_step).name

    def phase_at(self, t_s: float) -> int:
        """Index of the step in force at ``t_s``."""
        return max(i for i, s in enumerate(self.steps) if s.at_s <= t_s)

    def phase_end(self, index: int, duration_s: float) -> float:
        """When step ``index`` gives way to the next (or the run ends)."""
        return self.steps[index + 1].at_s if index + 1 < len(self.steps) else duration_s
