"""SparseVLM: training-free, text-guided visual-token sparsification for LLaVA-style device models."""

from device.sparse.adapters import UnsupportedModelError, adapter_for
from device.sparse.config import SparseConfig
from device.sparse.plugin import (
    apply_from_config,
    decision_prefix,
    disable_sparsevlm,
    enable_sparsevlm,
    expect_image_mask,
    sparse_stats,
)
from device.sparse.stats import PruneStep, SampleStats, SparseStats

__all__ = [
    "PruneStep",
    "SampleStats",
    "SparseConfig",
    "SparseStats",
    "UnsupportedModelError",
    "adapter_for",
    "apply_from_config",
    "decision_prefix",
    "disable_sparsevlm",
    "enable_sparsevlm",
    "expect_image_mask",
    "sparse_stats",
]
