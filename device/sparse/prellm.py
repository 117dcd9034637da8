"""Selection before the LLM: the VisionZip-style and DivPrune-style baselines, batched tensor ops.

VisionZip (Yang et al., CVPR 2025): the vision tower's CLS attention keeps the dominant tokens; of the rest,
every step-th is a contextual target and the others are merged into their most similar target
(``target + mean(assigned)``, as the released code does). DivPrune (Alvar et al., CVPR 2025): greedy max-min
diversity on the visual embeddings with cosine distance (first the token farthest from its nearest neighbour,
then repeatedly the one farthest from the chosen set).
"""

from __future__ import annotations

import torch

from device.sparse.config import VISIONZIP_CONTEXTUAL_SHARE


def divprune_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] (in selection order) of a max-min diverse subset of the rows of ``x`` [B, n, d]."""
    b, n, _ = x.shape
    k = min(k, n)
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    dist = 1.0 - xn @ xn.transpose(1, 2)  # cosine distance [B, n, n]
    chosen = torch.empty(b, k, dtype=torch.long, device=x.device)
    rows = torch.arange(b, device=x.device)
    # the first pick: the token whose nearest other token is farthest
    nearest = dist.topk(min(2, n), dim=1, largest=False).values[:, -1]
    chosen[:, 0] = nearest.argmax(dim=1)
    min_dist = dist[rows, chosen[:, 0]]
    for j in range(1, k):
        pick = min_dist.argmax(dim=1)  # already chosen tokens sit at distance 0 and are not picked again
        chosen[:, j] = pick
        min_dist = torch.minimum(min_dist, dist[rows, pick])
    return chosen


def visionzip_counts(budget: int) -> tuple[int, int]:
    """(dominant, contextual) tokens for a budget: 54 + 10 at 64, 108 + 20 at 128, 162 + 30 at 192."""
    contextual = int(budget * VISIONZIP_CONTEXTUAL_SHARE + 0.5) if budget > 1 else 0
    return budget - contextual, contextual


def visionzip_split(
    x: torch.Tensor, cls_attention: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample: ``x`` [n, d] visual tokens, ``cls_attention`` [n]. Returns the dominant indices, the
    contextual targets' indices and the contextual tokens [c, d] (each target plus the mean of the tokens
    merged into it)."""
    n = x.shape[0]
    n_dom, n_ctx = visionzip_counts(min(budget, n))
    dominant = cls_attention.topk(n_dom).indices.sort().values
    rest_mask = torch.ones(n, dtype=torch.bool, device=x.device)
    rest_mask[dominant] = False
    rest = torch.nonzero(rest_mask).flatten()
    if n_ctx == 0 or len(rest) == 0:
        return dominant, rest[:0], x[:0]
    n_ctx = min(n_ctx, len(rest))
    step = max(1, len(rest) // n_ctx)
    target_pos = torch.arange(0, len(rest), step, device=x.device)[:n_ctx]
    is_target = torch.zeros(len(rest), dtype=torch.bool, device=x.device)
    is_target[target_pos] = True
    targets, others = rest[is_target], rest[~is_target]
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    assign = (xn[others] @ xn[targets].T).argmax(dim=1)  # [m] -> target
    sums = x.new_zeros(len(targets), x.shape[1]).index_add_(0, assign, x[others])
    counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1).to(x.dtype)
    contextual = x[targets] + sums / counts[:, None]
    return dominant, targets, contextual
