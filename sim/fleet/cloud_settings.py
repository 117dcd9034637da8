"""The cloud service's config for a fleet run: the run's zoo as the model family's teacher and device base,
then the scenario's ``cloud:`` overrides (validated by the cloud's own config class when it starts)."""

from __future__ import annotations

from typing import Any

from sim.fleet.zoo import FleetZoo


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cloud_settings(zoo: FleetZoo, overrides: dict[str, Any]) -> dict[str, Any]:
    """Config keys for ``tandem-cloud serve`` (beyond host, port and data_dir, which the harness sets)."""
    base: dict[str, Any] = {}
    return _merge(base, overrides)
