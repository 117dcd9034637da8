"""What a sparse prefill did, per sample: visual-token counts per layer, raters, scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneStep:
    """One pruning layer of one sample."""

    layer: int
    before: int
    after: int
    merged: int
    rank: int | None = None


@dataclass
class SampleStats:
    """Per-sample result of a sparse prefill.

    ``layer_counts[i]``: visual tokens (merged tokens included) that decoder layer ``i`` processed.
    ``final_count``: visual tokens in the last layer (what the KV cache of the deepest layer holds).
    ``mean_count``: ``layer_counts`` averaged over all layers (the reference's single "equivalent tokens"
    number).
    ``kept_patches``: patch indices (0-based, sorted) of the original visual tokens alive in the last layer.
    ``visual_scores``: rater -> visual relevance at the first pruning layer, [n_visual] in original patch
    order (VisionZip: the CLS attention; DivPrune: none).
    ``final_visual``: the last layer's visual slots in sequence order, each (position id, input index or -1
    for a merged token): shows where merged tokens sit and whether positions were renumbered.
    """

    n_visual: int
    layer_counts: list[int]
    raters: list[int]
    visual_scores: torch.Tensor | None
    steps: list[PruneStep] = field(default_factory=list)
    fallback: str | None = None
    kept_patches: list[int] = field(default_factory=list)
    final_visual: list[tuple[int, int]] = field(default_factory=list)

    @property
    def final_count(self) -> int:
        return self.layer_counts[-1] if self.layer_counts else self.n_visual

    @property
    def mean_count(self) -> float:
        return sum(self.layer_counts) / len(self.layer_counts) if self.layer_counts else float(self.n_visual)


@dataclass
class SparseStats:
    """Stats of the last sparse prefill of a model (one entry per batch row)."""

    samples: list[SampleStats]

    @property
    def last_visual_scores(self) -> list[torch.Tensor | None]:
        return [s.visual_scores for s in self.samples]
