"""Tandem: bench package."""
