"""Configuration of the device's connection to the cloud gateway, loadable from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from common.config import StrictConfig


class ClientTlsConfig(StrictConfig):
    """CA that signed the gateway's certificate; a client cert + key turn on mutual TLS."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    """Override the name checked against the server certificate."""


class DeviceClientConfig(StrictConfig):
    """Everything the device's transport needs."""

    gateway: str = "127.0.0.1:50051"
    state_dir: Path = Path("tandem-device-state")
    device_id: str | None = None
    cohort: str = ""
    model_family: str = "tandem-zoo"
    model_version: str = "v0"
    initial_version: str = "v0"
    """Weights version the device holds before any update was applied."""
    enrollment_secret: str | None = None
    cloud_public_key: Path | None = None
    """Pinned update-signing key (PEM); without it the key returned by Register is trusted and saved."""
    tls: ClientTlsConfig | None = None
    batch_max_samples: int = Field(64, gt=0)
    batch_max_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_in_flight_batches: int = Field(2, ge=1, le=16)
    """Upload calls running at once (the next batch streams while the previous one commits)."""
    rpc_timeout_s: float = Field(60.0, gt=0)
    backoff_initial_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(10.0, gt=0)
    backoff_jitter_s: float = Field(0.5, ge=0)
    max_server_error_attempts: int = Field(5, ge=1)
    """An Upload answered UNKNOWN / INTERNAL / DATA_LOSS this many times in a row counts as refused for good."""
    poll_interval_s: float = Field(0.5, gt=0)
    heartbeat_interval_s: float = Field(30.0, gt=0)
    keepalive_time_s: float = Field(30.0, gt=0)
    keepalive_timeout_s: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0)
    compression: Literal["none", "gzip"] = "none"
    """gRPC message compression on the channel (worth it for compressible payloads on slow links)."""
