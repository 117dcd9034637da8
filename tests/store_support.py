"""Real backends for the store tests: a throwaway PostgreSQL cluster and a moto S3 server, each started once
per test session (on first use) and stopped at exit, plus the parametrised ``backend`` the suite runs over.

PostgreSQL: the server binaries of ``$TANDEM_PG_BIN`` or ``/usr/lib/postgresql/*/bin``. ``initdb`` refuses to
run as root, so under root (CI) the cluster belongs to the ``postgres`` user (``runuser -u postgres``).
Tests that need it are skipped, with the reason, where no binaries exist.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bench._pg_cluster import PG_VERSION_DIRS, PostgresCluster, find_pg_bin, free_port
from cloud.config import GatewayConfig


class MotoServer:
    """moto's S3 server mode (``python -m moto.server``) as a subprocess on 127.0.0.1."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> MotoServer:
        for _ in range(5):
            port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError("moto S3 server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


_cluster: PostgresCluster | None = None
_cluster_error: str | None = None
_moto: MotoServer | None = None
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def postgres_cluster() -> PostgresCluster:
    """The session's cluster (started on first call, stopped at exit); skips the test where none can run."""
    global _cluster, _cluster_error
    if _cluster is None and _cluster_error is None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            _cluster_error = (
                f"PostgreSQL server binaries not found ($TANDEM_PG_BIN or {PG_VERSION_DIRS}); "
                "install postgresql to run the PostgreSQL store tests"
            )
        else:
            cluster = None
            try:
                cluster = PostgresCluster(bin_dir)
                _cluster = cluster.start()
                atexit.register(_cluster.stop)
            except RuntimeError as exc:
                if cluster is not None:
                    cluster.stop()
                _cluster_error = f"cannot start a throwaway PostgreSQL from {bin_dir}: {exc}"
    if _cluster is None:
        pytest.skip(_cluster_error or "no PostgreSQL")
    return _cluster


def moto_server() -> MotoServer:
    """The session's moto S3 server, with test credentials in the environment (inherited by subprocesses)."""
    global _moto
    if _moto is None:
        for k, v in S3_ENV.items():
            os.environ.setdefault(k, v)
        _moto = MotoServer().start()
        atexit.register(_moto.stop)
    return _moto


@pytest.fixture
def pg_dsn():
    """DSN of a fresh, empty database on the session's PostgreSQL."""
    cluster = postgres_cluster()
    name = cluster.create_database()
    yield cluster.dsn(name)
    cluster.drop_database(name)


@pytest.fixture
def s3_bucket():
    """(endpoint, bucket): a fresh bucket on the session's moto server."""
    import boto3

    server = moto_server()
    bucket = f"tandem-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    return server.endpoint, bucket


@dataclass
class Backend:
    """One way to store the cloud's state, as config fields for gateways, trainers and the CLI."""

    name: str
    root: Path
    store_fields: dict = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """Several gateway processes may serve from it at once."""
        return self.name != "sqlite"

    def data_dir(self, gateway: str = "a") -> Path:
        """A gateway's own directory (SQLite keeps everything here; the shared backends only the key)."""
        return self.root / "sqlite" if not self.shared else self.root / f"gateway-{gateway}"

    def fields(self, gateway: str = "a") -> dict:
        """GatewayConfig fields for one gateway of this backend (the signing key is shared)."""
        return {"data_dir": self.data_dir(gateway), "signing_key": self.root / "signing.pem", **self.store_fields}

    def settings(self, gateway: str = "a", **extra) -> dict:
        """GatewayConfig keys for a subprocess (``tandem-cloud serve`` / ``updates publish``), DSN in clear."""
        cfg = GatewayConfig(
            **{
                "host": "127.0.0.1",
                "port": 0,
                "chunk_size": 64 * 1024,
                "max_message_bytes": 1024 * 1024,
                "watch_poll_interval_s": 0.2,
                "sqlite_synchronous": "NORMAL",
                "open_enrollment": True,
                **self.fields(gateway),
                **extra,
            }
        )
        data = cfg.model_dump(mode="json", exclude_none=True)
        if cfg.postgres_dsn is not None:
            data["postgres_dsn"] = cfg.dsn()
        return data

    def write_config(self, path: Path, gateway: str = "a", **extra) -> Path:
        """The same keys as a YAML file."""
        path.write_text(yaml.safe_dump(self.settings(gateway, **extra)))
        return path

    def open_samples(self, gateway: str = "a"):
        """A second, independent view of the sample store (another connection, a fresh blob client)."""
        from cloud.stores import open_sample_store

        cfg = GatewayConfig(**self.fields(gateway))
        return open_sample_store(cfg, cfg.data_dir)


def make_backend(name: str, root: Path, request) -> Backend:
    """The backend ``name`` (sqlite, postgres-dir, postgres-s3) with its servers and fresh state under ``root``."""
    if name == "sqlite":
        return Backend(name, root)
    dsn = request.getfixturevalue("pg_dsn")
    if name == "postgres-dir":
        return Backend(name, root, {"store": "postgres", "postgres_dsn": dsn, "blobs": {"directory": root / "blobs"}})
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    blobs = {"kind": "s3", "bucket": bucket, "endpoint_url": endpoint, "prefix": "cloud/"}
    return Backend(name, root, {"store": "postgres", "postgres_dsn": dsn, "blobs": blobs})


BACKENDS = ["sqlite", "postgres-dir", "postgres-s3"]
