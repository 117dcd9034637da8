"""Tandem: device package."""
