"""Tandem: protocol package."""
