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
    dist = (1.0 - x @ x.transpose(1, 2)).clamp_(min=0.0)  # [B, v, v]
    rel = scores.float() / scores.float().amax(dim=1, keepdim=True).clamp(min=1e-12)
    prior = rel.clamp(min=1e-12) ** weight
    rows = torch.arange(b, device=scores.device)
    chosen = torch.empty(b, picks, dtype=torch.long, device=scores.device)
    chosen[:, 0] = order[:, 0]
    nearest = dist[rows, order[:, 0]]
    nearest[rows, order[:, 0]] = -1.0  # chosen: below every candidate, exact duplicates (distance 0) included
    for j in range(1, picks):
        pick = (prior * nearest).argmax(dim=1)
        chosen[:, j] = pick
        nearest = torch.minimum(nearest, dist[rows, pick])
        nearest[rows, pick] = -1.0
    taken = torch.zeros(b, v, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
    rest = order[~taken.gather(1, order)].view(b, v - picks)
    return torch.cat([chosen, rest], dim=1)
