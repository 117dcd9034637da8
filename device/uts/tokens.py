"""UTS stage 2: which visual tokens of an uncertain sample to send.

Each token gets two ranks: relevance to the question (SparseVLM rater scores when given, else the device
model's own answer-position attention or hidden-state similarity, see ``common.llava_tokens``) and how
out-of-distribution its feature is against running statistics of the source domain (mean squared z-score
under a diagonal Gaussian). The top tokens by a weighted mix of the two ranks are kept; the rest are not
sent at all.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.errors import TandemError


class SourceFeatureStats:
    """Running per-dimension mean / variance of source-domain vision features (Welford, batched)."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self.mean = torch.zeros(self.dim, dtype=torch.float64)
        self.m2 = torch.zeros(self.dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add tokens [..., D] (e.g. [B, N, D]) to the statistics."""
        x = features.detach().reshape(-1, features.shape[-1]).double().cpu()
        if x.shape[1] != self.dim:
            raise TandemError(f"features have dimension {x.shape[1]}, statistics expect {self.dim}")
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(1, self.count - 1)

    def ood_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Mean squared z-score per token: [..., D] -> [...]."""
        if self.count < 2:
            raise TandemError("source feature statistics need at least two tokens before scoring")
        z2 = (features.double() - self.mean) ** 2 / (self.var + 1e-6)
        return z2.mean(-1).float()

    def save(self, path: str | Path) -> None:
        save_file(
            {"mean": self.mean, "m2": self.m2, "count": torch.tensor([self.count], dtype=torch.int64)},
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> SourceFeatureStats:
        data = load_file(str(path))
        stats = cls(data["mean"].numel())
        stats.mean, stats.m2, stats.count = data["mean"], data["m2"], int(data["count"][0])
        return stats


def _rank01(x: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1] (ties broken by position), robust to each score's scale."""
    n = x.numel()
    if n == 1:
        return torch.ones(1)
    ranks = torch.empty(n)
    ranks[torch.argsort(x.float(), stable=True)] = torch.arange(n, dtype=torch.float32)
    return ranks / (n - 1)


def token_priority(
    relevance: torch.Tensor | None, ood: torch.Tensor | None, relevance_weight: float = 0.5
) -> torch.Tensor:
    """Mixed rank score per token (higher = send first)."""
    if relevance is None and ood is None:
        raise TandemError("token selection needs relevance scores, OOD scores or both")
    parts = []
    if relevance is not None:
        parts.append((relevance_weight, _rank01(relevance)))
    if ood is not None:
        parts.append((1.0 - relevance_weight if relevance is not None else 1.0, _rank01(ood)))
    if relevance is not None and ood is not None and relevance.shape != ood.shape:
        raise TandemError(f"relevance {tuple(relevance.shape)} and OOD {tuple(ood.shape)} scores differ")
    return sum(w * r for w, r in parts)  # type: ignore[return-value]


def select_tokens(priority: torch.Tensor, keep_ratio: float, min_tokens: int = 1) -> torch.Tensor:
    """Indices (ascending) of the ``ceil(keep_ratio * N)`` highest-priority tokens."""
    if not 0.0 < keep_ratio <= 1.0:
        raise TandemError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    n = priority.numel()
    k = min(n, max(min_tokens, math.ceil(keep_ratio * n)))
    return torch.sort(torch.topk(priority, k).indices).values
