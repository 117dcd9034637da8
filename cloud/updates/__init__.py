"""Versioned, signed updates per device and per cohort: the interface and its SQLite + files implementation."""

from cloud.updates.base import UpdateRecord, UpdateRegistry
from cloud.updates.sqlite import SqliteUpdateRegistry

__all__ = ["SqliteUpdateRegistry", "UpdateRecord", "UpdateRegistry"]
