"""Choosing the kept visual tokens from rater relevance without keeping one region many times.

Text-guided scores alone keep near-copies of one region (an object's patches all rate alike) and spend the
budget there; max-min diversity alone (DivPrune) covers the image but ignores the question. Tandem picks
greedily by relevance times distance to the nearest token already kept, which does both (bench/sparsevlm.py
measures it against both on the reference zoo).
"""

from __future__ import annotations

import torch


def weighted_maxmin_order(scores: torch.Tensor, states: torch.Tensor, weight: float, picks: int) -> torch.Tensor:
    """Token order [B, v], best first: ``picks`` tokens chosen greedily, each the one maximising
    ``relevance ** weight * distance to the nearest chosen token`` (cosine distance; relevance scaled to a
    maximum of 1; the first pick is the most relevant token), then the rest by relevance.

    ``weight`` 0 is max-min diversity alone (DivPrune's rule after its first pick); a large weight approaches
    the relevance order. The text decides which regions matter, the distance that no region is kept twice.
    """
    b, v, _ = states.shape
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    picks = min(picks, v)
    if picks <= 1:
        return order
    x = torch.nn.functional.normalize(states.float(), dim=-1)
    rel = scores.float() / scores.float().amax(dim=1, keepdim=True).clamp(min=1e-12)
    prior = rel.clamp(min=1e-12) ** weight  # [B, v]
    # gain[i] = prior[i] * min over chosen j of dist(j, i) = min over chosen j of weighted[j, i] (prior >= 0),
    # weighted[j, i] = prior[i] * (1 - cos(j, i)): one fused matmul, then one clamp
    weighted = torch.baddbmm(prior[:, None, :], x, (x * prior[..., None]).transpose(1, 2), alpha=-1.0).clamp_(min=0.0)
    # a chosen token's own entry is -1: it then sits below every candidate (exact duplicates included)
    weighted.diagonal(dim1=1, dim2=2).fill_(-1.0)
    if b == 1:  # one row: plain row indexing (one op per step instead of two-tensor indexing)
        flat = weighted[0]

        def gains_after(pick: torch.Tensor) -> torch.Tensor:
            return flat[pick]
    else:
        rows = torch.arange(b, device=scores.device)

        def gains_after(pick: torch.Tensor) -> torch.Tensor:
            return weighted[rows, pick]

    picked = [order[:, 0]]
    gain = gains_after(picked[0])
    for _ in range(1, picks):
        picked.append(gain.argmax(dim=1))
        gain = torch.minimum(gain, gains_after(picked[-1]))
    chosen = torch.stack(picked, dim=1)
    taken = torch.zeros(b, v, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
    rest = order[~taken.gather(1, order)].view(b, v - picks)
    return torch.cat([chosen, rest], dim=1)
