"""Tandem: common package."""
