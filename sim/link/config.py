"""What a link looks like: bandwidth per direction, latency, jitter, loss, cuts, outages and an optional trace."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from common.config import StrictConfig


class Outage(StrictConfig):
    """A window (seconds after the proxy starts) during which the link carries nothing."""

    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)


class LinkConfig(StrictConfig):
    """Emulated link between one device and the cloud. ``None`` bandwidth means unlimited."""

    up_mbps: float | None = Field(None, gt=0)
    """Device -> cloud, megabits per second."""
    down_mbps: float | None = Field(None, gt=0)
    """Cloud -> device, megabits per second."""
    latency_ms: float = Field(0.0, ge=0)
    """One-way delay added in each direction."""
    jitter_ms: float = Field(0.0, ge=0)
    """Uniform +- spread on the delay (order is preserved)."""
    loss: float = Field(0.0, ge=0, lt=1)
    """Packet loss rate. The proxy carries a TCP stream, so a lost packet is what TCP makes of it: the piece
    that held it (and everything behind it) arrives one retransmission timeout late; no byte is dropped."""
    mtu_bytes: int = Field(1500, gt=0)
    """Packet size the loss rate applies to."""
    min_rto_ms: float = Field(200.0, ge=0)
    """Lower bound of the retransmission timeout (Linux's default); the timeout is max(this, 2 x delay)."""
    cut_probability_per_s: float = Field(0.0, ge=0)
    """Chance per second that every open connection is cut (checked every 100 ms)."""
    cut_schedule_s: list[float] = Field(default_factory=list)
    """Seconds after start at which every open connection is cut."""
    outages: list[Outage] = Field(default_factory=list)
    trace: Path | None = None
    """CSV file of link conditions over time (``sim.link.trace``); its rows override the fields above."""
    trace_loop: bool = False
    """Replay the trace from its start once it ends (otherwise its last row holds)."""
    seed: int = 0
    read_chunk_bytes: int = Field(64 * 1024, gt=0)

    @model_validator(mode="after")
    def _sorted(self) -> LinkConfig:
        self.__dict__["cut_schedule_s"] = sorted(self.cut_schedule_s)
        return self

    @staticmethod
    def mbps_to_bytes_per_s(mbps: float | None) -> float | None:
        """Megabits per second to bytes per second."""
        return None if mbps is None else mbps * 1_000_000 / 8
