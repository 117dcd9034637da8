"""Versioned, signed updates per device and per cohort: interface and SQLite + files implementation."""

from cloud.updates.base import UpdateRecord, UpdateRegistry
from cloud.updates.sqlite import SqliteUpdateRegistry

__all__ = ["SqliteUpdateRegistry", "UpdateRecord", "UpdateRegistry"]
