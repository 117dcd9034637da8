"""Opens the cloud's stores on the configured backend: SQLite files under ``data_dir`` (one gateway), or
PostgreSQL plus a shared blob store (several gateways and the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud.adaptation.jobs import JobStore
from cloud.config import StoreSettings
from cloud.devices import Devices
from cloud.samples.base import SampleStore
from cloud.updates.base import UpdateRegistry
from common.signing import Ed25519PrivateKey


def _engine(settings: StoreSettings, role: str):
    """A SQLAlchemy engine on the shared database, every store's schema migrated first (once, under an advisory
    lock, whichever process comes first)."""
    from cloud.migrations import migrate
    from cloud.schemas import ALL
    from cloud.sql import postgres_engine

    engine = postgres_engine(settings.dsn(), f"tandem-{role}")
    try:
        migrate(engine, *ALL, where="the PostgreSQL database")
    except BaseException:
        engine.dispose()
        raise
    return engine


def _blobs(settings: StoreSettings, data_dir: Path, synchronous: str):
    from cloud.blobs import open_blob_store

    return open_blob_store(settings.blobs, Path(data_dir) / "blobs", fsync=synchronous == "FULL")


def open_sample_store(settings: StoreSettings, data_dir: Path, synchronous: str = "FULL") -> SampleStore:
    """The sample store of the configured backend."""
    from cloud.samples.store import SqliteSampleStore, SqlSampleStore

    if settings.store == "postgres":
        from cloud.samples.payloads import BlobPayloads

        return SqlSampleStore(_engine(settings, "samples"), BlobPayloads(_blobs(settings, data_dir, synchronous)))
    return SqliteSampleStore(Path(data_dir) / "samples.db", synchronous=synchronous)


def open_device_registry(settings: StoreSettings, data_dir: Path, synchronous: str = "FULL") -> Devices:
    """The device registry on the configured backend."""
    from cloud.devices import DeviceRegistry

    if settings.store == "postgres":
        return DeviceRegistry(_engine(settings, "devices"), dsn=settings.dsn())
    return DeviceRegistry(Path(data_dir) / "devices.db", synchronous)


def open_update_registry(
    settings: StoreSettings, data_dir: Path, signing_key: Ed25519PrivateKey, synchronous: str = "FULL"
) -> UpdateRegistry:
    """The update registry of the configured backend."""
    from cloud.updates.registry import SqliteUpdateRegistry, SqlUpdateRegistry

    if settings.store == "postgres":
        engine = _engine(settings, "updates")
        blobs = _blobs(settings, data_dir, synchronous)
        return SqlUpdateRegistry(engine, blobs, signing_key, blob_prefix="updates/", dsn=settings.dsn())
    return SqliteUpdateRegistry(Path(data_dir) / "updates", signing_key, synchronous)


def open_job_store(settings: StoreSettings, state_dir: Path, synchronous: str = "FULL") -> JobStore:
    """The trainer's job store on the configured backend (``jobs.db`` under ``state_dir`` on SQLite)."""
    from cloud.adaptation.job_store import SqliteJobStore, SqlJobStore

    if settings.store == "postgres":
        return SqlJobStore(_engine(settings, "jobs"))
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    return SqliteJobStore(Path(state_dir) / "jobs.db", synchronous)


@dataclass
class CloudStores:
    """The three stores a gateway serves from."""

    samples: SampleStore
    devices: Devices
    updates: UpdateRegistry

    def close(self) -> None:
        """Close every store."""
        self.samples.close()
        self.devices.close()
        self.updates.close()


def open_stores(
    settings: StoreSettings, data_dir: Path, signing_key: Ed25519PrivateKey, synchronous: str = "FULL"
) -> CloudStores:
    """Samples, devices and updates on one backend; a failure closes what was already opened."""
    opened: list = []
    try:
        opened.append(open_sample_store(settings, data_dir, synchronous))
        opened.append(open_device_registry(settings, data_dir, synchronous))
        opened.append(open_update_registry(settings, data_dir, signing_key, synchronous))
    except BaseException:
        for store in opened:
            store.close()
        raise
    return CloudStores(*opened)
