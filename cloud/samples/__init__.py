"""Durable sample store: the interface and its SQLite and PostgreSQL implementations
(``cloud.stores.open_sample_store`` picks one from the config)."""

from cloud.samples.base import Sample, SampleStore
from cloud.samples.sqlite import SqliteSampleStore

__all__ = ["Sample", "SampleStore", "SqliteSampleStore"]
