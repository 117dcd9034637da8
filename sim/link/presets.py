"""Named link profiles: typical figures of common access links, as starting points for scenarios.

Figures are typical, not measured here: wifi (a home 802.11ac link), lte (a mid-cell 4G link), 3g (HSPA at the
cell edge), satellite (a geostationary consumer link: about 600 ms one way).
"""

from __future__ import annotations

from typing import Any

from common.errors import ConfigError
from sim.link.config import LinkConfig

PRESETS: dict[str, dict[str, Any]] = {
    "wifi": {"up_mbps": 50.0, "down_mbps": 100.0, "latency_ms": 3.0, "jitter_ms": 1.0, "loss": 0.0},
    "lte": {"up_mbps": 10.0, "down_mbps": 30.0, "latency_ms": 35.0, "jitter_ms": 10.0, "loss": 0.002},
    "3g": {"up_mbps": 0.384, "down_mbps": 2.0, "latency_ms": 100.0, "jitter_ms": 30.0, "loss": 0.01},
    "satellite": {"up_mbps": 3.0, "down_mbps": 25.0, "latency_ms": 300.0, "jitter_ms": 20.0, "loss": 0.005},
}
"""Preset name -> LinkConfig fields (latency is one way; satellite's 300 ms each way is ~600 ms RTT)."""


def preset_fields(name: str) -> dict[str, Any]:
    """The fields of preset ``name``; ConfigError naming the known presets otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown link preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def link_config(preset: str | None = None, **overrides: Any) -> LinkConfig:
    """A LinkConfig from a preset (or none: an ideal link) with fields overridden."""
    fields = preset_fields(preset) if preset else {}
    fields.update(overrides)
    return LinkConfig(**fields)
