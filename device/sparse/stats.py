"""What a sparse prefill did, per sample: visual-token counts per layer, raters, scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

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
    # (position ids, input indices, visual flags) of the last layer's slots and the patch index of every input
    # column: ``kept_patches`` and ``final_visual`` are read from them on demand (a prefill does not pay for lists)
    final_slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @cached_property
    def kept_patches(self) -> list[int]:
        if self.final_slots is None:
            return []
        _, orig, visual, patch_of = self.final_slots
        return patch_of[orig[visual & (orig >= 0)]].tolist()

    @cached_property
    def final_visual(self) -> list[tuple[int, int]]:
        if self.final_slots is None:
            return []
        pos, orig, visual, _ = self.final_slots
        return list(zip(pos[visual].tolist(), orig[visual].tolist(), strict=True))

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
