"""The cloud service's config for a fleet run: the run's zoo as the model family's teacher and device base, a
local Ray sized to this machine, then the scenario's ``cloud:`` overrides (validated by the cloud's own config
class, ``cloud.config.GatewayConfig``, when the service starts)."""

from __future__ import annotations

import os
from typing import Any

from sim.fleet.devices import MODEL_FAMILY
from sim.fleet.zoo import FleetZoo


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cloud_settings(zoo: FleetZoo, overrides: dict[str, Any], agent: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config keys for ``tandem-cloud serve`` (beyond host, port and data_dir, which the harness sets). When the
    scenario's agents answer in a set number of tokens (``agent.model.max_new_tokens``), the teacher labels
    uploads with answers of that length."""
    family: dict[str, Any] = {"device_model": str(zoo.device), "teacher_model": str(zoo.teacher)}
    tokens = ((agent or {}).get("model") or {}).get("max_new_tokens")
    if tokens:
        family["max_new_tokens"] = int(tokens)
    base: dict[str, Any] = {
        # The scenario is the operator: its devices enrol themselves in the cohorts it gives them (a deployment
        # keeps enrollment closed and provisions each device with `tandem-cloud devices add`).
        "open_enrollment": True,
        "sqlite_synchronous": "NORMAL",
        "watch_poll_interval_s": 0.5,
        "adaptation": {
            "families": {MODEL_FAMILY: family},
            "poll_interval_s": 1.0,
            "ray": {"num_cpus": max(1, min(2, os.cpu_count() or 1)), "include_dashboard": False},
        },
    }
    return _merge(base, overrides)
