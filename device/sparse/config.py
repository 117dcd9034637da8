"""SparseVLM configuration, stored on the model config as ``config.sparsevlm`` (a plain dict)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config import StrictConfig

# Reference pruning layers of SparseVLM on the 32-layer LLaVA-1.5-7B (0-based), as fractions of the depth.
_REFERENCE_LAYER_FRACTIONS = (2 / 32, 6 / 32, 15 / 32)


class SparseConfig(StrictConfig):
    """How visual tokens are sparsified inside the language model.

    ``method``: ``sparsevlm`` (text raters, the paper), ``fastv`` (last-token attention of the layer before
    the
    single pruning layer) or ``random`` (seeded random scores; a baseline).
    ``mode``: ``budget`` prunes to ``budget`` visual tokens after the last pruning layer (geometric
    schedule in
    between, or ``schedule`` given explicitly); ``rank`` deletes ``round(rank_lambda * (L_v - rank(P)))``
    of the
    ``L_v`` current visual tokens at every pruning layer, ``P`` the rater x visual attention matrix.
    ``schedule`` (budget mode) gives the count after each pruning layer explicitly and overrides ``budget``.
    Recycled (merged) tokens count as visual tokens in every budget.
    ``layers``: 0-based decoder layers *before* which tokens are pruned (scored with that layer's own
    queries and
    keys); ``None`` scales the reference layers [2, 6, 15] of a 32-layer model to the model's depth (a
    2-layer model
    gets [0, 1]: a pre-LM pruning step with layer-0 scores, then one more inside).
    """

    enabled: bool = True
    method: Literal["sparsevlm", "fastv", "random"] = "sparsevlm"
    mode: Literal["budget", "rank"] = "budget"
    budget: int = Field(64, ge=1)
    schedule: list[int] | None = None
    layers: list[int] | None = None
    rank_lambda: float = Field(0.5, gt=0.0, le=1.0)
    rank_rtol: float = Field(1e-4, gt=0.0, lt=1.0)
    recycle: bool = True
    recycle_ratio: float = Field(0.3, ge=0.0, le=1.0)
    cluster_ratio: float = Field(0.1, gt=0.0, le=1.0)
    cluster_knn: int = Field(5, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SparseConfig:
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must name at least one decoder layer (or be null for the default)")
            if any(x < 0 for x in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError("layers must be distinct non-negative layer indices")
        if self.schedule is not None:
            if self.mode != "budget":
                raise ValueError("schedule applies to mode 'budget' only")
            if any(c < 1 for c in self.schedule):
                raise ValueError("schedule counts must be >= 1")
            if any(b > a for a, b in zip(self.schedule, self.schedule[1:], strict=False)):
                raise ValueError("schedule counts must not increase")
        if self.method == "random" and self.mode == "rank":
            raise ValueError("mode 'rank' needs attention scores; method 'random' supports mode 'budget' only")
        if self.method == "fastv" and self.layers is not None and len(self.layers) != 1:
            raise ValueError("method 'fastv' prunes at exactly one layer")
        return self

    def pruning_layers(self, num_layers: int) -> list[int]:
        """The pruning layers used on a decoder of ``num_layers`` layers (sorted, in range)."""
        if self.layers is not None:
            return sorted(x for x in self.layers if x < num_layers)
        if self.method == "fastv":
            # FastV prunes after layer K-1 = 1 (K=2) with that layer's attention; shallow models use K=1.
            return [min(2, max(num_layers - 1, 0))]
        return sorted({min(round(num_layers * f), num_layers - 1) for f in _REFERENCE_LAYER_FRACTIONS})

    def step_targets(self, n_visual: int, n_steps: int) -> list[int]:
        """Budget mode: visual-token counts to reach after each of ``n_steps`` pruning layers."""
        if self.schedule is not None:
            counts = list(self.schedule[:n_steps])
            return counts + [self.schedule[-1]] * (n_steps - len(counts))
        if n_visual <= self.budget:
            return [n_visual] * n_steps
        ratio = self.budget / n_visual
        counts = [round(n_visual * ratio ** ((i + 1) / n_steps)) for i in range(n_steps)]
        counts[-1] = self.budget
        return counts
