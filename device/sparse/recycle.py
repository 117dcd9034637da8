"""Token recycling: cluster the best-scored pruned tokens (density-peak kNN) and merge each cluster
into one."""

from __future__ import annotations

import math

import torch


def recycle_plan(
    target: int, n_visual: int, recycle: bool, recycle_ratio: float, cluster_ratio: float
) -> int:
    """How many merged tokens to create when pruning ``n_visual`` tokens down to ``target`` (merged
    included)."""
    if not recycle or target >= n_visual or target <= 1:
        return 0
    n_recycled = min(int(recycle_ratio * (n_visual - target)) + 1, n_visual - target)
    groups = int(n_recycled * cluster_ratio) + 1
    return max(0, min(groups, n_recycled, target - 1))


def cluster_dpc_knn(x: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """Labels in [0, groups) for the rows of ``x`` [n, d] by density-peak clustering with kNN density.

    Deterministic: density ties are broken by index. Centers are the ``groups`` points with the largest
    density x distance-to-denser-point; every point joins its nearest center.
    """
    n = x.shape[0]
    if groups >= n:
        return torch.arange(n, device=x.device)
    xf = x.float()
    sq = (xf * xf).sum(dim=-1)
    # |a-b|^2 via one matmul (torch.cdist takes a much slower path on CPU for these sizes)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (xf @ xf.T)).clamp_(min=0.0).sqrt_() / math.sqrt(x.shape[-1])
    dist.fill_diagonal_(0.0)
    kk = max(1, min(k, n - 1))
    knn = dist.topk(kk + 1, dim=-1, largest=False).values[:, 1:]
    density = torch.exp(-(knn**2).mean(dim=-1))
    idx = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(dim=-1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centers = (density * delta).topk(groups).indices
    labels = dist[:, centers].argmin(dim=-1)
    labels[centers] = torch.arange(groups, device=x.device)
    return labels


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of the members of each cluster: [groups, d]."""
    sums = torch.zeros(groups, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=groups).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]
