"""Tandem: cloud package."""
