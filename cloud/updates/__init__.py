"""Versioned, signed updates per device and per cohort: the interface and its one SQL implementation."""

from cloud.updates.base import UpdateRecord, UpdateRegistry
from cloud.updates.registry import SqliteUpdateRegistry, SqlUpdateRegistry

__all__ = ["SqlUpdateRegistry", "SqliteUpdateRegistry", "UpdateRecord", "UpdateRegistry"]
