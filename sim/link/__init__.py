"""Link emulation: an asyncio TCP proxy with bandwidth, latency, jitter, loss, cuts, outages, presets and traces."""

from sim.link.bucket import TokenBucket
from sim.link.config import LinkConfig, Outage
from sim.link.presets import PRESETS, link_config
from sim.link.proxy import LinkProxy, LinkStats
from sim.link.trace import LinkState, LinkTrace

__all__ = [
    "PRESETS",
    "LinkConfig",
    "LinkProxy",
    "LinkState",
    "LinkStats",
    "LinkTrace",
    "Outage",
    "TokenBucket",
    "link_config",
]
