"""Shared pytest fixtures and settings."""

from __future__ import annotations

import os

import torch

# Respect OMP_NUM_THREADS when set (shared machines); otherwise use at most two threads.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
