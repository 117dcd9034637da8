"""SparseVLM configuration, stored on the model config as ``config.sparsevlm`` (a plain dict).

Two presets: ``SparseConfig()`` (Tandem's defaults) and ``SparseConfig.paper_parity(budget)`` (the choices of
the authors' released code, Gumpest/SparseVLMs). Every choice where they differ is a named field below whose
docstring names the source it follows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config import StrictConfig

# Reference pruning layers of SparseVLM on the 32-layer LLaVA-1.5-7B (0-based), as fractions of the depth.
_REFERENCE_LAYER_FRACTIONS = (2 / 32, 6 / 32, 15 / 32)
REFERENCE_VISUAL = 576  # LLaVA-1.5's visual-token count: the paper's budgets (192/128/64) are of 576
# The released code's visual tokens kept (top-k, merged tokens not counted) after layers 2, 6 and 15, per budget
# (score.py, version 1.0); with its merged tokens the counts are [309, 204, 113], [312, 117, 39], [82, 32, 18].
REFERENCE_KEPT_LISTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
# VisionZip's dominant : contextual split (54 + 10 at 64, 108 + 20 at 128, 162 + 30 at 192).
VISIONZIP_CONTEXTUAL_SHARE = 10 / 64

Method = Literal["sparsevlm", "fastv", "random", "visionzip", "divprune"]
PRE_LLM_METHODS = ("visionzip", "divprune")


class SparseConfig(StrictConfig):
    """How visual tokens are sparsified inside (or in front of) the language model.

    ``method``: ``sparsevlm`` (text raters, the paper), ``fastv`` (last-token attention of the layer before
    its single pruning layer), ``random`` (seeded random scores), ``visionzip`` (before the LLM: the vision
    tower's CLS attention keeps the dominant tokens, the rest are merged by similarity into a few contextual
    tokens) or ``divprune`` (before the LLM: greedy max-min diversity selection on the visual embeddings).
    ``mode``: ``budget`` prunes to a budget (see ``budget_kind``; geometric schedule between pruning layers,
    or ``schedule`` / ``schedule_fractions``); ``rank`` deletes ``round(rank_lambda * (L_v - rank(P)))`` of the
    ``L_v`` current visual tokens at every pruning layer, ``P`` the rater x visual attention matrix.
    Recycled (merged) tokens count as visual tokens in every budget.
    ``layers``: 0-based decoder layers at which tokens are pruned (see ``prune_point``); ``None`` scales the
    reference layers [2, 6, 15] of a 32-layer model to the model's depth (a 2-layer model gets [0, 1]).
    """

    enabled: bool = True
    method: Method = "sparsevlm"
    mode: Literal["budget", "rank"] = "budget"
    budget: int = Field(64, ge=1)
    budget_kind: Literal["final", "layer_average"] = "final"
    """How ``budget`` is read. ``final``: visual tokens after the last pruning layer (Tandem's original
    meaning). ``layer_average``: visual tokens averaged over all LM layers (the paper's "retain 64"); the
    final count is then derived for the model's depth and pruning layers (``plan``)."""
    step_ratio: float | None = Field(None, gt=0.0, le=1.0)
    """Layer-average budgets: each pruning step keeps this fraction of the previous step's count, the first
    count chosen so that the layer average meets the budget. ``None``: counts fall geometrically from the
    visual-token count to the final count (most tokens go at the deepest pruning layer, where the text has
    read the image)."""
    relevance_weight: float | None = Field(1.0, ge=0.0)
    """Method ``sparsevlm``: how the kept tokens are chosen from the rater scores. A number: greedily, each
    next token the one with the largest ``relevance ** relevance_weight * cosine distance to the nearest
    token kept so far`` (Tandem; 0 is DivPrune's max-min diversity, larger numbers lean to relevance): the
    text decides which regions matter and the distance keeps one region from filling the budget. ``None``:
    the most relevant tokens (the paper and the released code). Recycled tokens follow by relevance."""
    budget_reference: int | None = Field(None, ge=1)
    """If set, ``budget`` is stated for this many visual tokens and scaled to the model's count (the paper's
    64 of 576 is 16 of 144). ``None``: ``budget`` is an absolute count."""
    schedule: list[int] | None = None
    schedule_fractions: list[float] | None = None
    """Counts after each pruning layer as fractions of the visual-token count (overrides ``budget``); the
    paper-parity preset uses the released code's per-layer lists (``REFERENCE_KEPT_LISTS`` plus its merged
    tokens, over 576)."""
    layers: list[int] | None = None
    rank_lambda: float = Field(0.5, gt=0.0, le=1.0)
    rank_rtol: float = Field(1e-4, gt=0.0, lt=1.0)
    recycle: bool = True
    recycle_ratio: float = Field(0.3, ge=0.0, le=1.0)
    cluster_ratio: float = Field(0.1, gt=0.0, le=1.0)
    cluster_knn: int = Field(5, ge=1)
    seed: int = 0
    rater_scaled: bool = True
    """Rater relevance ``softmax(Hv Ht^T / sqrt(d))``. Tandem: scaled, as attention is (paper Eq. 2 has no
    scale; the released code none either: ``False``)."""
    rater_strict: bool = False
    """Raters are text tokens with relevance ``> mean`` (released code, ``True``) or ``>= mean`` (Tandem,
    ``False``: never empty when any text follows the image)."""
    prune_point: Literal["before", "after"] = "before"
    """``before``: tokens are scored with layer l's own queries/keys and dropped before layer l runs
    (Tandem: layer l already runs on fewer tokens). ``after``: layer l runs on the full sequence and its
    output is pruned (released code)."""
    positions: Literal["original", "renumber"] = "original"
    """``original``: kept tokens keep their position ids (Tandem; SparseVLM v2.0). ``renumber``: positions are
    renumbered 0..n-1 after each prune (released v1.0/v1.5 code: ``position_ids[:, :n]``)."""
    merged_placement: Literal["best_member", "after_kept"] = "best_member"
    """Where a merged (recycled) token sits: at its best-scored member's slot (Tandem) or after the kept
    visual block, before the text (released code)."""
    cluster_density: Literal["knn_excluding_self", "cluster_num_including_self"] = "knn_excluding_self"
    """Density of the recycling clustering: mean over ``cluster_knn`` nearest neighbours, the token itself
    excluded (Tandem), or over ``cluster_num`` nearest including itself (released code's
    ``cluster_and_merge``)."""

    @model_validator(mode="after")
    def _check(self) -> SparseConfig:
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must name at least one decoder layer (or be null for the default)")
            if any(x < 0 for x in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError("layers must be distinct non-negative layer indices")
        for name in ("schedule", "schedule_fractions"):
            counts = getattr(self, name)
            if counts is None:
                continue
            if self.mode != "budget":
                raise ValueError(f"{name} applies to mode 'budget' only")
            if not counts or any(c <= 0 for c in counts):
                raise ValueError(f"{name} values must be > 0")
            if any(b > a for a, b in zip(counts, counts[1:], strict=False)):
                raise ValueError(f"{name} values must not increase")
        if self.schedule is not None and self.schedule_fractions is not None:
            raise ValueError("give schedule or schedule_fractions, not both")
        if self.schedule_fractions is not None and max(self.schedule_fractions) > 1:
            raise ValueError("schedule_fractions must be <= 1")
        if self.method in ("random", *PRE_LLM_METHODS) and self.mode == "rank":
            raise ValueError(f"mode 'rank' needs rater attention; method {self.method!r} supports mode 'budget' only")
        if self.method == "fastv" and self.layers is not None and len(self.layers) != 1:
            raise ValueError("method 'fastv' prunes at exactly one layer")
        if self.method in PRE_LLM_METHODS and self.layers not in (None, [0]):
            raise ValueError(f"method {self.method!r} selects before the LLM (layers [0] or null)")
        return self

    @classmethod
    def paper_parity(cls, budget: int = 64, **overrides: object) -> SparseConfig:
        """The released code's choices (Gumpest/SparseVLMs; v1.0 rank rule aside) at one of its budgets
        (192, 128, 96 or 64 of 576): raters unscaled with ``>``, prune after layers 2/6/15, positions
        renumbered, merged tokens after the kept block, density over ``cluster_num`` neighbours including
        itself, and its per-layer kept lists (scaled to the model's visual-token count)."""
        if budget not in REFERENCE_KEPT_LISTS:
            raise ValueError(f"the released code has kept lists for {sorted(REFERENCE_KEPT_LISTS)} only, not {budget}")
        fractions = [c / REFERENCE_VISUAL for c in reference_counts(budget)]
        fields: dict[str, object] = dict(
            budget=budget,
            budget_kind="layer_average",
            budget_reference=REFERENCE_VISUAL,
            schedule_fractions=fractions,
            rater_scaled=False,
            rater_strict=True,
            prune_point="after",
            positions="renumber",
            merged_placement="after_kept",
            cluster_density="cluster_num_including_self",
            relevance_weight=None,
        )
        return cls(**{**fields, **overrides})

    def pruning_layers(self, num_layers: int) -> list[int]:
        """The layers whose tokens are pruned on a decoder of ``num_layers`` layers (sorted, in range)."""
        if self.method in PRE_LLM_METHODS:
            return [0]
        if self.layers is not None:
            return sorted(x for x in self.layers if x < num_layers)
        if self.method == "fastv":
            # FastV prunes after layer K-1 = 1 (K=2) with that layer's attention; shallow models use K=1.
            return [min(2, max(num_layers - 1, 0))]
        return sorted({min(round(num_layers * f), num_layers - 1) for f in _REFERENCE_LAYER_FRACTIONS})

    def drop_layers(self, num_layers: int) -> list[int]:
        """Layers before which tokens are dropped (``prune_point`` 'after' drops before layer l + 1)."""
        layers = self.pruning_layers(num_layers)
        if self.prune_point == "after" and self.method not in PRE_LLM_METHODS:
            return [x + 1 for x in layers if x + 1 < num_layers]
        return layers

    def scaled_budget(self, n_visual: int) -> int:
        """``budget`` in the model's visual-token count (``budget_reference`` scaling)."""
        if self.budget_reference is None:
            return self.budget
        return max(1, round(self.budget * n_visual / self.budget_reference))

    def _geometric(self, n_visual: int, n_steps: int, final: int) -> list[int]:
        if n_visual <= final:
            return [n_visual] * n_steps
        ratio = final / n_visual
        counts = [round(n_visual * ratio ** ((i + 1) / n_steps)) for i in range(n_steps)]
        counts[-1] = final
        return counts

    def step_targets(self, n_visual: int, n_steps: int, num_layers: int | None = None) -> list[int]:
        """Budget mode: visual-token counts to reach after each of ``n_steps`` drop points.

        ``num_layers`` is needed for ``budget_kind='layer_average'`` (the final count depends on the depth).
        """
        if self.schedule is not None:
            counts = list(self.schedule[:n_steps])
            return counts + [self.schedule[-1]] * (n_steps - len(counts))
        if self.schedule_fractions is not None:
            fractions = self._fractions_per_step(num_layers)
            counts = [max(1, min(n_visual, round(f * n_visual))) for f in fractions[:n_steps]]
            return counts + [counts[-1]] * (n_steps - len(counts))
        target = self.scaled_budget(n_visual)
        if self.budget_kind == "final" or n_steps == 0:
            return self._geometric(n_visual, n_steps, target)
        if num_layers is None:
            raise ValueError("budget_kind 'layer_average' needs the model's number of layers")
        drops = self.drop_layers(num_layers)[:n_steps]
        if self.step_ratio is not None:
            return self._decaying(n_visual, num_layers, drops, target)
        best: tuple[float, int] | None = None
        for final in range(1, n_visual + 1):  # the final count whose layer average is nearest the target
            avg = _layer_average(n_visual, num_layers, drops, self._geometric(n_visual, len(drops), final))
            if best is None or abs(avg - target) < best[0]:
                best = (abs(avg - target), final)
            if avg > target:
                break
        return self._geometric(n_visual, n_steps, best[1] if best else target)

    def _decaying(self, n_visual: int, num_layers: int, drops: list[int], target: int) -> list[int]:
        """Counts falling by ``step_ratio`` per step whose layer average is nearest ``target``."""
        ratio = self.step_ratio or 1.0
        best: tuple[float, list[int]] | None = None
        for first in range(1, n_visual + 1):
            counts = [max(1, min(n_visual, round(first * ratio**i))) for i in range(len(drops))]
            avg = _layer_average(n_visual, num_layers, drops, counts)
            if best is None or abs(avg - target) < best[0]:
                best = (abs(avg - target), counts)
            if avg > target:
                break
        return best[1] if best else [target] * len(drops)

    def _fractions_per_step(self, num_layers: int | None) -> list[float]:
        """``schedule_fractions`` per drop point. With the default layers on a shallow model several reference
        layers land on one layer; that layer takes the deepest of them (the smallest count)."""
        fractions = list(self.schedule_fractions or [])
        if self.layers is not None or num_layers is None or len(fractions) != len(_REFERENCE_LAYER_FRACTIONS):
            return fractions
        scaled = [min(round(num_layers * f), num_layers - 1) for f in _REFERENCE_LAYER_FRACTIONS]
        per_layer = {layer: fractions[i] for i, layer in enumerate(scaled)}  # later (deeper) entries win
        picked = [per_layer[layer] for layer in sorted(per_layer)]
        if self.prune_point == "after":  # a step after the last layer drops nothing
            picked = [f for layer, f in zip(sorted(per_layer), picked, strict=True) if layer + 1 < num_layers]
        return picked

    def plan(self, n_visual: int, num_layers: int) -> list[int]:
        """Budget mode: the visual-token count every LM layer processes (before any per-sample fallback).

        Its mean is the paper's layer-averaged count, its last entry the final count.
        """
        drops = self.drop_layers(num_layers)
        return _layer_counts(n_visual, num_layers, drops, self.step_targets(n_visual, len(drops), num_layers))


def reference_counts(budget: int) -> list[int]:
    """The released code's visual-token counts after each pruning layer, merged tokens included.

    Each step keeps ``k`` tokens by score and merges ``int(int(0.3 * pruned) + 1) / 10) + 1`` recycled ones:
    [66, 30, 17] -> [82, 32, 18] at 64.
    """
    counts, current = [], REFERENCE_VISUAL
    for kept in REFERENCE_KEPT_LISTS[budget]:
        kept = min(kept, current - 1)
        recycled = int((current - kept) * 0.3) + 1
        current = kept + int(recycled / 10) + 1
        counts.append(current)
    return counts


def _layer_counts(n_visual: int, num_layers: int, drops: list[int], targets: list[int]) -> list[int]:
    counts, current, steps = [], n_visual, dict(zip(drops, targets, strict=False))
    for layer in range(num_layers):
        current = min(current, steps.get(layer, current))
        counts.append(current)
    return counts


def _layer_average(n_visual: int, num_layers: int, drops: list[int], targets: list[int]) -> float:
    counts = _layer_counts(n_visual, num_layers, drops, targets)
    return sum(counts) / len(counts)
