"""Tandem: sim package."""
