"""Durable sample store: the interface, its one SQL implementation, and where payload bytes live
(``cloud.stores.open_sample_store`` opens it on the configured backend)."""

from cloud.samples.base import Sample, SampleStore
from cloud.samples.store import SqliteSampleStore, SqlSampleStore

__all__ = ["Sample", "SampleStore", "SqlSampleStore", "SqliteSampleStore"]
