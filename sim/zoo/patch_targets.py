"""Dense per-patch targets and heads for pretraining the shared vision tower.

As CLIP learnt from its captions, the zoo's tower learns from dense scene annotations: for every patch the colour
and shape of the object that owns it, where that object lies in the image, and whether the patch holds an
object's centre. The heads exist only for pretraining and to initialise the projectors
(``train.init_projector_from_heads``). (Adding per-patch object counts to these targets was tried: the 64-wide
tower then lost a third of its shape accuracy.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sim.world import COLORS, SHAPES
from sim.world.dataset import Sample, patch_labels, patch_owners
from sim.world.questions import POSITIONS, position_of

# name -> number of classes; class 0 means background / not applicable except for "total".
TARGETS: dict[str, int] = {
    "color": len(COLORS) + 1,
    "shape": len(SHAPES) + 1,
    "centre": 2,
    "region": len(POSITIONS) + 1,
}
_WEIGHTS = {"centre": torch.tensor([1.0, 4.0])}


def patch_targets(sample: Sample, patch_size: int) -> dict[str, np.ndarray]:
    """Every per-patch target of one sample (int64 arrays over the patch grid, row-major)."""
    color, shape, centre = patch_labels(sample, patch_size)
    owner = patch_owners(sample, patch_size)
    region = np.zeros_like(color)
    for i, obj in enumerate(sample.scene.objects):
        pos = position_of(obj, sample.scene.size)
        region[owner == i] = 0 if pos is None else 1 + POSITIONS.index(pos)
    return {"color": color, "shape": shape, "centre": centre, "region": region}


def batch_targets(samples: list[Sample], patch_size: int) -> dict[str, torch.Tensor]:
    """Stacked targets of a batch: name -> B x patches."""
    per_sample = [patch_targets(s, patch_size) for s in samples]
    return {name: torch.from_numpy(np.stack([t[name] for t in per_sample])) for name in TARGETS}


class DensePatchHeads(nn.Module):
    """One linear classifier per target, applied to every patch feature."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in TARGETS.items()})

    def all(self) -> list[nn.Linear]:
        return [self.heads[name] for name in TARGETS]

    def logits(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        return self.heads[name](feats)

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the per-target cross-entropies over all patches."""
        ce = nn.functional.cross_entropy
        return sum(
            ce(self.heads[name](feats).flatten(0, 1), targets[name].flatten(), weight=_WEIGHTS.get(name))
            for name in TARGETS
        )

    def uniform_loss(self, feats: torch.Tensor, names: tuple[str, ...] = tuple(TARGETS)) -> torch.Tensor:
        """Cross-entropy of the named heads' readings against the uniform distribution, less its minimum
        (0 when they read nothing)."""
        total = torch.zeros(())
        for name in names:
            n = TARGETS[name]
            logp = nn.functional.log_softmax(self.heads[name](feats), dim=-1)
            total = total + (-logp.mean(-1)).mean() - float(np.log(n))
        return total
