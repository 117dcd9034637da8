"""User-facing errors: raised for bad input, shown by the CLIs as one line with a non-zero exit."""

from __future__ import annotations


class TandemError(Exception):
    """An error whose message is meant for the person running Tandem (no traceback needed)."""


class ConfigError(TandemError):
    """A configuration value, option or file is invalid."""


class ModelLoadError(TandemError):
    """A model directory or hub id could not be loaded."""
