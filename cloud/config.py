"""Configuration of the cloud gateway (``tandem-cloud serve``), loadable from YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator

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


POSTGRES_DSN_ENV = "TANDEM_POSTGRES_DSN"


class BlobStoreConfig(StrictConfig):
    """Where payload blobs live with ``store: postgres``: a directory every process mounts, or S3."""

    kind: Literal["directory", "s3"] = "directory"
    directory: Path | None = None
    """Shared directory (NFS, a ReadWriteMany PVC); default ``<data_dir>/blobs``."""
    bucket: str | None = None
    """S3 bucket; credentials come from boto3's chain (``AWS_ACCESS_KEY_ID`` ... from a Secret)."""
    prefix: str = ""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph); None is AWS."""
    region: str | None = None
    create_bucket: bool = False

    @model_validator(mode="after")
    def _check(self) -> BlobStoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("blobs.kind s3 needs blobs.bucket")
        return self


class StoreSettings(StrictConfig):
    """Which backend holds samples, devices, updates and jobs: embedded SQLite, or PostgreSQL shared by
    several gateways and the trainer (with payload blobs in ``blobs``)."""

    store: Literal["sqlite", "postgres"] = Field("sqlite", validation_alias=AliasChoices("store", "sample_store"))
    postgres_dsn: SecretStr | None = None
    """libpq DSN or URI; when unset, read from $TANDEM_POSTGRES_DSN (a Kubernetes Secret)."""
    blobs: BlobStoreConfig = Field(default_factory=BlobStoreConfig)

    @model_validator(mode="after")
    def _check_store(self) -> StoreSettings:
        if self.store == "postgres" and not self.dsn():
            raise ValueError(f"store postgres needs postgres_dsn or ${POSTGRES_DSN_ENV}")
        if self.store == "sqlite" and self.blobs.kind != "directory":
            raise ValueError("blobs.kind s3 needs store: postgres (SQLite keeps payloads in its data_dir)")
        return self

    def dsn(self) -> str:
        """The PostgreSQL DSN ('' when none is configured)."""
        if self.postgres_dsn is not None:
            return self.postgres_dsn.get_secret_value()
        return os.environ.get(POSTGRES_DSN_ENV, "")


class SimulationConfig(StrictConfig):
    """The modelled cluster (the simulator's cloud profile) and the clock file it shares."""

    clock_file: Path
    gpus: int = Field(1, ge=1)
    """Training GPUs: at most this many jobs run at once in virtual time."""
    job_overhead_s: float = Field(5.0, ge=0)
    """Fixed seconds per job (scheduling, loading the learner state, signing, publishing)."""
    teacher_samples_per_s: float = Field(50.0, gt=0)
    """Samples the teacher labels per second on one GPU."""
    learner_samples_per_s: float = Field(20.0, gt=0)
    """Sample-epochs the learner trains per second on one GPU."""
    host: bool = False
    """Model nothing: a job's update is visible at its start + the seconds it took on this machine."""

    def job_seconds(self, samples: int, epochs: int) -> float:
        """Modelled wall time of one job on one GPU of the profiled cluster."""
        return (
            self.job_overhead_s + samples / self.teacher_samples_per_s + samples * epochs / (self.learner_samples_per_s)
        )


class GatewayConfig(StoreSettings):
    """Everything ``tandem-cloud serve`` needs."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    data_dir: Path = Path("tandem-cloud-data")
    signing_key: Path | None = None
    """Ed25519 private key (PEM) that signs updates; default ``<data_dir>/keys/cloud_ed25519.pem``."""
    create_signing_key: bool = True
    """Generate the signing key on first start when it does not exist."""
    enrollment_secret: str | None = None
    """Fleet-wide secret: a device that presents it may enrol an id the operator has not provisioned."""
    open_enrollment: bool = False
    """Development only: anyone may enrol a new id, in the cohort it claims. Off: only ids the operator
    provisioned (``tandem-cloud devices add``, each with a one-time code) or holders of ``enrollment_secret``
    enrol, and the cohort is the operator's."""
    tls: ServerTlsConfig | None = None
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, gt=0)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    max_sample_bytes: int = Field(DEFAULT_MAX_SAMPLE_BYTES, gt=0)
    max_concurrent_streams: int = Field(1000, gt=0)
    keepalive_time_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(20.0, gt=0)
    min_client_ping_interval_s: float = Field(10.0, gt=0)
    max_buffered_bytes: int = Field(512 * 1024 * 1024, gt=0)
    """Sample bytes all Upload streams together may hold in memory (received, verifying or committing)."""
    max_upload_streams: int = Field(128, gt=0)
    """Upload calls served at once; one more answers RESOURCE_EXHAUSTED before anything is read. Memory beyond
    ``max_buffered_bytes`` is at most one first chunk (plus gRPC's window) per open Upload stream."""
    max_stream_buffer_bytes: int | None = Field(None, gt=0)
    """Sample bytes one Upload stream may hold; default ``max_sample_bytes + chunk_size``. A stream at its
    cap waits for its own commits; the global cap answers RESOURCE_EXHAUSTED after ``buffer_wait_s``."""
    buffer_wait_s: float = Field(5.0, ge=0)
    """How long a stream waits for room in ``max_buffered_bytes`` before RESOURCE_EXHAUSTED."""
    validation_workers: int = Field(1, ge=1, le=64)
    """Threads that verify completed samples (each holds about one sample's worth of extra memory)."""
    upload_idle_timeout_s: float = Field(60.0, gt=0)
    """An Upload stream that sends no message for this long is ended (DEADLINE_EXCEEDED) and its buffers freed."""
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """FULL survives power loss; NORMAL (WAL) survives process crashes only."""
    commit_batch_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Group commit: samples of concurrent uploads are written in one transaction up to this size."""
    watch_poll_interval_s: float = Field(1.0, gt=0)
    """How often WatchUpdates looks for updates published by another process (the CLI)."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Prometheus /metrics port; None keeps it off."""
    grace_s: float = Field(5.0, ge=0)
    log_json: bool = True
    """``serve`` logs one JSON object per line (``common.logs``, as the agent); False: plain text."""
    adaptation: AdaptationConfig = AdaptationConfig()
    """The trainer (scheduler, jobs, learners, executor); see docs/cloud-service.md."""
    simulation: SimulationConfig | None = None
    """Set only by the fleet simulator: virtual time from its clock file and a modelled cluster
    (cloud/simulated.py)."""

    @model_validator(mode="after")
    def _check_limits(self) -> GatewayConfig:
        check_chunk_fits(self.chunk_size, self.max_message_bytes)
        if self.stream_buffer_bytes > self.max_buffered_bytes:
            raise ValueError(
                f"the per-stream buffer ({self.stream_buffer_bytes} bytes) must fit in max_buffered_bytes "
                f"({self.max_buffered_bytes})"
            )
        if self.stream_buffer_bytes < self.max_sample_bytes + self.chunk_size:
            raise ValueError("max_stream_buffer_bytes must hold max_sample_bytes + chunk_size")
        return self

    @property
    def stream_buffer_bytes(self) -> int:
        """The per-stream buffer cap in bytes."""
        return self.max_stream_buffer_bytes or self.max_sample_bytes + self.chunk_size

    @property
    def adaptation_dir(self) -> Path:
        """Learner state and the job database."""
        return self.adaptation.state_dir or self.data_dir / "adaptation"

    @property
    def signing_key_path(self) -> Path:
        """Where the update-signing key lives."""
        return self.signing_key or self.data_dir / "keys" / "cloud_ed25519.pem"
