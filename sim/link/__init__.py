"""Link emulation: an asyncio TCP proxy with bandwidth, latency, jitter, cuts and outages."""

from sim.link.bucket import TokenBucket
from sim.link.config import LinkConfig, Outage
from sim.link.proxy import LinkProxy

__all__ = ["LinkConfig", "LinkProxy", "Outage", "TokenBucket"]
