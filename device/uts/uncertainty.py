"""UTS stage 1 scores: how unsure the device is of its own answer.

``confidence`` is the sequence confidence (product over answer tokens of the max softmax probability, the
CD-CCA reference's score), ``entropy`` the mean predictive entropy normalised by log(V) to [0, 1], ``energy``
the free energy -T * logsumexp(logits / T) (higher = more out-of-distribution). The gate ranks samples by one
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

    def row(self, i: int) -> dict[str, float]:
        """Scores of sample ``i`` as plain floats (what the upload carries)."""
        return {
            "confidence": float(self.confidence[i]),
            "entropy": float(self.entropy[i]),
            "energy": float(self.energy[i]),
        }


def answer_uncertainty(logits: torch.Tensor, temperature: float = 1.0) -> AnswerUncertainty:
    """Scores from answer logits [B, V] (first answer token) or [B, T, V] (T generated tokens)."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
    if logits.dim() != 3 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"answer logits must be [B>0, (T>0,) V], got {tuple(logits.shape)}")
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    confidence = probs.amax(dim=-1).prod(dim=1)
    entropy = -(probs * logp).sum(dim=-1).mean(dim=1) / math.log(logits.shape[-1])
    energy = (-temperature * torch.logsumexp(logits / temperature, dim=-1)).mean(dim=1)
    return AnswerUncertainty(confidence=confidence, entropy=entropy, energy=energy)


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
