"""Scores for visual tokens: rater -> visual attention from one layer's own queries and keys (RoPE applied).

Only the rater rows of the attention matrix are computed ([heads, raters, tokens]), so the decoder layers keep
their SDPA attention and no full attention matrix is ever materialised.
"""

from __future__ import annotations

import torch

from device.sparse.adapters import DecoderAdapter


def attention_rank(p: torch.Tensor, rtol: float) -> int:
    """Numerical rank of the rater x visual attention matrix P (singular values above rtol * largest)."""
    if p.numel() == 0:
        return 0
    return int(torch.linalg.matrix_rank(p.double(), rtol=rtol).item())


def random_scores(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random scores (the random-pruning baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen).to(device)


def rater_attention_batch(
    adapter: DecoderAdapter,
    layer_idx: int,
    normed: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Head-averaged causal softmax attention of rater ``rows`` over all tokens: [B, R, n].

    ``normed`` [B, n, hidden] is the layer input after its input norm; ``rows`` [B, R] (padded rows repeat a
    real one); ``valid`` [B, n] masks padding / filler keys (``None``: all real).
    """
    q, k, scaling = adapter.query_key(layer_idx, normed, cos, sin, rows)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    n = normed.shape[1]
    blocked = torch.arange(n, device=normed.device)[None, None, :] > rows[:, :, None]
    if valid is not None:
        blocked = blocked | ~valid[:, None, :]
    logits = logits.masked_fill(blocked[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
