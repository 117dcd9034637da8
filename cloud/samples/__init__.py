"""Durable sample store: the interface and its SQLite implementation."""

from cloud.samples.base import Sample, SampleStore
from cloud.samples.sqlite import SqliteSampleStore

__all__ = ["Sample", "SampleStore", "SqliteSampleStore", "open_sample_store"]


def open_sample_store(kind: str, data_dir: str, synchronous: str = "FULL") -> SampleStore:
    """Factory by configured kind (only ``sqlite`` today; a server database or object store can be added)."""
    if kind == "sqlite":
        return SqliteSampleStore(f"{data_dir}/samples.db", synchronous=synchronous)
    raise ValueError(f"unknown sample store kind: {kind!r}")
