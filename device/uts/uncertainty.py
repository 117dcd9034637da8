"""UTS stage 1 scores: how unsure the device is of its own answer (one token or a generated sequence).

``confidence`` is the sequence confidence (product over answer tokens of the max softmax probability, the
CD-CCA reference's score), ``entropy`` the mean token entropy normalised by log(V) to [0, 1], ``energy``
the mean free energy -T * logsumexp(logits / T) (higher = more out-of-distribution), ``margin`` the lowest
top-1 minus top-2 probability over the tokens (the least decided token of the answer). With a ``mask`` only a
row's own tokens count (answers of different lengths in one batch). The gate ranks samples by one
of them (``uncertainty_score``) against a threshold that adapts to the uplink budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScoreKind = Literal["confidence", "entropy", "energy", "combined"]


@dataclass
class AnswerUncertainty:
    """Per-sample scores for a batch (each [B])."""

    confidence: torch.Tensor
    entropy: torch.Tensor
    energy: torch.Tensor
    margin: torch.Tensor
    token_confidence: torch.Tensor  # [B, T] top-1 probability of each token (masked-out tokens: 1)

    def row(self, i: int) -> dict[str, float]:
        """Scores of sample ``i`` as plain floats (what the upload carries)."""
        return {
            "confidence": float(self.confidence[i]),
            "entropy": float(self.entropy[i]),
            "energy": float(self.energy[i]),
            "margin": float(self.margin[i]),
        }


def answer_uncertainty(
    logits: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> AnswerUncertainty:
    """Scores from answer logits [B, V] (first answer token) or [B, T, V] (T generated tokens); ``mask`` [B, T]
    marks each row's tokens (default: all; every row needs at least one)."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
    if logits.dim() != 3 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"answer logits must be [B>0, (T>0,) V], got {tuple(logits.shape)}")
    if mask is None:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if mask.shape != logits.shape[:2] or not bool(mask.any(dim=1).all()):
        raise ValueError(f"mask must be [B, T] = {tuple(logits.shape[:2])} with a token in every row")
    logits, weight = logits.float(), mask.float()
    count = weight.sum(dim=1)
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    top1 = top2[..., 0].masked_fill(~mask, 1.0)
    gap = (top2[..., 0] - top2[..., -1]) if top2.shape[-1] > 1 else top2[..., 0]
    token_entropy = -(probs * logp).sum(dim=-1) / math.log(logits.shape[-1])
    token_energy = -temperature * torch.logsumexp(logits / temperature, dim=-1)
    return AnswerUncertainty(
        confidence=top1.prod(dim=1),
        entropy=(token_entropy * weight).sum(dim=1) / count,
        energy=(token_energy * weight).sum(dim=1) / count,
        margin=gap.masked_fill(~mask, float("inf")).amin(dim=1),
        token_confidence=top1,
    )


def uncertainty_score(u: AnswerUncertainty, kind: ScoreKind = "confidence") -> torch.Tensor:
    """One score per sample, larger = more uncertain."""
    if kind == "confidence":
        return 1.0 - u.confidence
    if kind == "entropy":
        return u.entropy
    if kind == "energy":
        return u.energy
    if kind == "combined":
        return 0.5 * ((1.0 - u.confidence) + u.entropy)
    raise ValueError(f"unknown uncertainty score {kind!r}")
