"""What a fleet run measured, per device over time and for the fleet: the content of ``results.json``."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Point(BaseModel):
    """One device at one moment: its domain, the adapter version it serves and what that version scores."""

    t_s: float
    domain: str
    version: str
    accuracy: float
    """Held-out samples of ``domain`` answered with the device's current adapters."""
    none: float
    """The same samples with no adaptation (the base device model)."""
    teacher: float
    """The same samples answered by the teacher."""
    ceiling: float | None = None
    """The same samples with the true-label ceiling's adapters for the version served (``sim.fleet.ceiling``)."""
    up_bytes: int
    """Bytes the device's link carried up so far (everything: uploads, heartbeats, gRPC framing)."""
    down_bytes: int
    stream_accuracy: float | None = None
    """Share of the frames answered since the previous point whose answer was right (the live stream)."""


class UpdateApplied(BaseModel):
    """An update the device applied."""

    t_s: float
    version: str
    latencies_s: list[float] = Field(default_factory=list)
    """Capture-to-applied time of every sample this update was the first to learn from."""


class Rollback(BaseModel):
    """The device's guard (or the harness) went back to an earlier version."""

    t_s: float
    from_version: str
    to_version: str
    reason: str = ""


class SampleCounts(BaseModel):
    """Every captured frame's fate; ``lost`` counts acked samples missing from the cloud's store."""

    frames: int = 0
    selected: int = 0
    acked: int = 0
    stored: int = 0
    stored_twice: int = 0
    pending: int = 0
    lost: int = 0


class DeviceResult(BaseModel):
    """Everything measured for one device."""

    device_id: str
    group: str
    cohort: str
    link: dict
    points: list[Point] = Field(default_factory=list)
    updates: list[UpdateApplied] = Field(default_factory=list)
    rollbacks: list[Rollback] = Field(default_factory=list)
    refused_candidates: int = 0
    published_updates: int = 0
    superseded_updates: int = 0
    """Published for this device (or its cohort) but never applied because a later one was."""
    rejected_updates: int = 0
    """Updates the device refused (verification or apply failed)."""
    samples: SampleCounts = SampleCounts()
    up_bytes: int = 0
    down_bytes: int = 0
    update_payload_bytes: int = 0
    """Payload bytes of the updates the device applied (the part of ``down_bytes`` that is updates)."""
    link_stats: dict = Field(default_factory=dict)
    """The link emulator's counters: connections, refused, cuts, retransmits."""
    send_all_bytes: int = 0
    """What uploading every frame with every visual token would have cost (encoded payload bytes)."""
    ask_ms: list[float] = Field(default_factory=list)
    upload_ack_ms: list[float] = Field(default_factory=list)
    phases: list[dict] = Field(default_factory=list)
    """Per drift step: domain, start and end time (from the scenario)."""

    def latencies_s(self) -> list[float]:
        """Every capture-to-applied latency of this device."""
        return [x for u in self.updates for x in u.latencies_s]


class FleetResult(BaseModel):
    """A whole run: the scenario, per-device results, and run facts (zoo, byte references, memory, wall)."""

    run: str
    scenario: dict
    devices: list[DeviceResult]
    facts: dict = Field(default_factory=dict)
