"""Redundancy-aware ranking of visual tokens: relevance discounted by similarity to more relevant tokens.

Text-guided scores alone keep many near-copies of the same region (one object's patches all rate alike); the
tokens after them in the ranking then cover nothing new. Each candidate's relevance is multiplied by
``(1 - r) ** strength``, ``r`` its largest cosine similarity to a token ranked above it by relevance, in one
batched pass (no per-token greedy loop): a maximal-marginal-relevance ranking against the relevance order.
"""

from __future__ import annotations

import torch


def diverse_order(scores: torch.Tensor, states: torch.Tensor, strength: float, candidates: int) -> torch.Tensor:
    """Token order [B, v] (indices into the v visual tokens), best first.

    ``scores`` [B, v] relevance, ``states`` [B, v, d] the tokens' hidden states; only the ``candidates`` most
    relevant are re-ranked (the rest keep their relevance order after them).
    """
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    if strength <= 0:
        return order
    m = min(scores.shape[1], max(1, candidates))
    top = order[:, :m]
    x = states.gather(1, top[..., None].expand(*top.shape, states.shape[-1])).float()
    x = torch.nn.functional.normalize(x, dim=-1)
    # largest similarity to any more relevant token (row i sees columns j < i); the most relevant has none
    redundancy = torch.tril(x @ x.transpose(1, 2), diagonal=-1).amax(dim=-1).clamp_(0.0, 1.0)
    discounted = scores.gather(1, top) * (1.0 - redundancy) ** strength
    reranked = top.gather(1, torch.argsort(discounted, dim=1, descending=True, stable=True))
    return torch.cat([reranked, order[:, m:]], dim=1)
