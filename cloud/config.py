"""Configuration of the cloud gateway (``tandem-cloud serve``), loadable from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cloud.adaptation.config import AdaptationConfig
from common.config import StrictConfig
from protocol.limits import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_SAMPLE_BYTES,
    check_chunk_fits,
)


class ServerTlsConfig(StrictConfig):
    """Server certificate; with ``client_ca_file`` the gateway also requires client certificates (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    bind_client_cert_to_device: bool = False
    """With mutual TLS: the client certificate's common name must equal the device id (Register included)."""


class GatewayConfig(StrictConfig):
    """Everything ``tandem-cloud serve`` needs."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    data_dir: Path = Path("tandem-cloud-data")
    signing_key: Path | None = None
    """Ed25519 private key (PEM) that signs updates; default ``<data_dir>/keys/cloud_ed25519.pem``."""
    create_signing_key: bool = True
    """Generate the signing key on first start when it does not exist."""
    enrollment_secret: str | None = None
    """When set, Register requires this shared secret."""
    tls: ServerTlsConfig | None = None
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, gt=0)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    max_sample_bytes: int = Field(DEFAULT_MAX_SAMPLE_BYTES, gt=0)
    max_concurrent_streams: int = Field(1000, gt=0)
    keepalive_time_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(20.0, gt=0)
    min_client_ping_interval_s: float = Field(10.0, gt=0)
    sample_store: Literal["sqlite"] = "sqlite"
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """FULL survives power loss; NORMAL (WAL) survives process crashes only."""
    commit_batch_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Group commit: samples of concurrent uploads are written in one transaction up to this size."""
    watch_poll_interval_s: float = Field(1.0, gt=0)
    """How often WatchUpdates looks for updates published by another process (the CLI)."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Prometheus /metrics port; None keeps it off."""
    grace_s: float = Field(5.0, ge=0)
    adaptation: AdaptationConfig = AdaptationConfig()
    """The trainer (scheduler, jobs, learners, executor); see docs/cloud-service.md."""

    @model_validator(mode="after")
    def _check_limits(self) -> GatewayConfig:
        check_chunk_fits(self.chunk_size, self.max_message_bytes)
        return self

    @property
    def adaptation_dir(self) -> Path:
        """Learner state and the job database."""
        return self.adaptation.state_dir or self.data_dir / "adaptation"

    @property
    def signing_key_path(self) -> Path:
        """Where the update-signing key lives."""
        return self.signing_key or self.data_dir / "keys" / "cloud_ed25519.pem"
