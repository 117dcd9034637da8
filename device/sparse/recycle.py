"""Token recycling: cluster the best-scored pruned tokens (density-peak kNN) and merge each cluster
into one."""

from __future__ import annotations

from functools import lru_cache

import torch


def recycled_count(n_pruned: int, recycle_ratio: float) -> int:
    """Pruned tokens recycled (the best-scored ``int(ratio * n_pruned) + 1``, at most all of them)."""
    return min(int(recycle_ratio * n_pruned) + 1, n_pruned)


def groups_for(n_recycled: int, cluster_ratio: float) -> int:
    """Merged tokens made from ``n_recycled`` recycled ones: ``int(n_recycled * cluster_ratio) + 1``."""
    return min(int(n_recycled * cluster_ratio) + 1, n_recycled)


@lru_cache(maxsize=4096)
def recycle_plan(target: int, n_visual: int, recycle: bool, recycle_ratio: float, cluster_ratio: float) -> int:
    """How many merged tokens to create when pruning ``n_visual`` tokens down to ``target`` (merged included).

    As in the paper and the released code, the groups follow from the recycled count, which follows from the
    tokens actually pruned: keeping ``k = target - g`` prunes ``n_visual - k``, recycles
    ``r = int(recycle_ratio * (n_visual - k)) + 1`` and merges them into ``g = int(r * cluster_ratio) + 1``.
    ``g`` is the fixed point of that chain (it exists: each step of ``g`` moves the right side by 0 or 1).
    576 -> 82 gives 16 merged tokens (66 kept), as the released code's 64 setting does.
    """
    if not recycle or target >= n_visual or target <= 1:
        return 0
    for g in range(1, target):
        if groups_for(recycled_count(n_visual - (target - g), recycle_ratio), cluster_ratio) <= g:
            return g
    return target - 1


def cluster_dpc_knn(x: torch.Tensor, groups: int, k: int, include_self: bool = False) -> torch.Tensor:
    """Labels in [0, groups) for the rows of ``x`` [n, d] (see ``cluster_dpc_knn_batch``)."""
    return cluster_dpc_knn_batch(x[None], groups, k, include_self)[0]


def cluster_dpc_knn_batch(x: torch.Tensor, groups: int, k: int, include_self: bool = False) -> torch.Tensor:
    """Labels [B, n] in [0, groups) for ``x`` [B, n, d] by density-peak clustering with kNN density.

    Density: ``exp(-mean d^2)`` over the ``k`` nearest neighbours, the point itself excluded, or included
    (``include_self``: the released code's ``cluster_and_merge``, there with ``k = groups``).
    Deterministic: density ties are broken by index. Centers are the ``groups`` points with the largest
    density x distance-to-denser-point; every point joins its nearest center.
    """
    b, n, d = x.shape
    if groups >= n:
        return torch.arange(n, device=x.device).expand(b, n).clone()
    xf = x.float()
    sq = (xf * xf).sum(dim=-1)
    # squared distances via one batched matmul (torch.cdist takes a much slower path on CPU at these sizes);
    # every comparison below is on squared distances, so only [B, n] vectors are scaled and square-rooted
    sqd = torch.baddbmm(sq[:, :, None] + sq[:, None, :], xf, xf.transpose(1, 2), alpha=-2.0)
    sqd.diagonal(dim1=1, dim2=2).fill_(0.0)
    # (rounding can leave tiny negative squared distances; only the [B, n] results below are clamped)
    if include_self:
        knn = sqd.topk(max(1, min(k, n)), dim=-1, largest=False).values
    else:
        kk = max(1, min(k, n - 1))
        knn = sqd.topk(kk + 1, dim=-1, largest=False).values[..., 1:]
    density = torch.exp(-knn.mean(dim=-1).clamp_(min=0.0) / d)
    # rank by density, ties by index: j is denser than i iff rank[j] < rank[i]
    order = torch.argsort(-density, dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    delta_sq = sqd.masked_fill(rank[:, None, :] >= rank[:, :, None], float("inf")).amin(dim=-1)
    # the densest point (nothing denser) takes the largest distance
    delta_sq = torch.minimum(delta_sq, sqd.amax(dim=(1, 2))[:, None]).clamp_(min=0.0)
    centers = (density * (delta_sq / d).sqrt()).topk(groups, dim=-1).indices
    labels = sqd.gather(2, centers[:, None, :].expand(b, n, groups)).argmin(dim=-1)
    labels.scatter_(1, centers, torch.arange(groups, device=x.device).expand(b, groups).contiguous())
    return labels


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of the members of each cluster: [groups, d]."""
    return merge_clusters_batch(x[None], labels[None], groups)[0]


def merge_clusters_batch(x: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of the members of each cluster: ``x`` [B, n, d], ``labels`` [B, n] -> [B, groups, d]."""
    b, n, d = x.shape
    sums = x.new_zeros(b, groups, d).scatter_add_(1, labels[..., None].expand(b, n, d), x)
    counts = x.new_zeros(b, groups).scatter_add_(1, labels, x.new_ones(b, n)).clamp_(min=1.0)
    return sums / counts[..., None]
