"""UTS, the device-side pipeline: answer, score uncertainty, gate on the budget, pick tokens, encode."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from common.config import StrictConfig
from common.feature_basis import KNOWN_BASES, FeatureBasis
from common.llava_tokens import PromptBuilder, answer_forward
from common.sample_codec import UploadSample
from device.uts.budget import BudgetGate, GateConfig
from device.uts.rate import RateChooser, RateConfig
from device.uts.tokens import SourceFeatureStats, select_tokens, token_priority
from device.uts.uncertainty import ScoreKind, answer_uncertainty, uncertainty_score


class UTSConfig(StrictConfig):
    """Uncertainty-guided token sampling settings."""

    score: ScoreKind = "confidence"
    gate: GateConfig = GateConfig()
    keep_ratio: float = Field(0.25, gt=0.0, le=1.0)
    min_tokens: int = Field(4, ge=1)
    relevance_weight: float = Field(0.5, ge=0.0, le=1.0)
    relevance_source: Literal["auto", "attention", "similarity"] = "auto"
    top_answers: int = Field(5, ge=1)
    rate: RateConfig = RateConfig()


@dataclass
class UTSResult:
    """The device's answer for one sample and what UTS decided."""

    answer_id: int
    uncertainty: dict[str, float]
    score: float
    sent: bool
    payload: bytes | None = None
    token_indices: torch.Tensor | None = None


class UncertaintyTokenSampler:
    """Stateful per device (the budget gate keeps its history between calls)."""

    def __init__(
        self,
        config: UTSConfig | None = None,
        source_stats: SourceFeatureStats | None = None,
        basis: FeatureBasis | None = None,
    ) -> None:
        self.config = config or UTSConfig()
        self.gate = BudgetGate(self.config.gate)
        self.source_stats = source_stats
        self.rates = RateChooser(self.config.rate)
        self.set_basis(basis)

    def set_basis(self, basis: FeatureBasis | None) -> None:
        """Encode in format /2 on ``basis`` from now on (None: format /1, for a cloud that lacks the codec)."""
        if basis is not None:
            KNOWN_BASES.add(basis)  # the outbox checks each upload as the gateway will, on this basis
        self.rates.basis = basis

    def _relevance(self, i: int, out, rater: torch.Tensor | None) -> torch.Tensor | None:
        if rater is not None:
            return rater.float()
        source = self.config.relevance_source
        if source in ("auto", "attention") and out.attention is not None:
            return out.attention[i].detach().float().cpu()
        if source == "attention":
            raise ValueError("relevance_source='attention' needs a model running eager attention")
        return out.similarity[i].detach().float().cpu()

    def pick_tokens(self, features: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
        """Stage 2 for one sample: indices of the tokens to send."""
        ood = self.source_stats.ood_scores(features) if self.source_stats is not None else None
        if relevance is not None and relevance.numel() != features.shape[0]:
            raise ValueError(f"{relevance.numel()} relevance scores for {features.shape[0]} tokens")
        priority = token_priority(relevance, ood, self.config.relevance_weight)
        return select_tokens(priority, self.config.keep_ratio, self.config.min_tokens)

    @torch.no_grad()
    def process(
        self,
        model: torch.nn.Module,
        prompts: PromptBuilder,
        features: torch.Tensor,
        questions: list[str],
        rater_scores: list[torch.Tensor | None] | None = None,
    ) -> list[UTSResult]:
        """Run the device model on all tokens of each frame, then decide and encode the uploads.

        ``features`` [B, N, D] are the vision tower's features (what LLaVA feeds the projector);
        ``rater_scores[i]`` [N] are optional per-token relevance scores (SparseVLM's raters).
        """
        if features.dim() != 3 or features.shape[0] == 0:
            raise ValueError(f"features must be [B>0, N, D], got {tuple(features.shape)}")
        if rater_scores is not None and len(rater_scores) != features.shape[0]:
            raise ValueError("one rater score vector (or None) per sample is required")
        out = answer_forward(model, prompts, list(features), questions, with_relevance=True)
        relevance = [
            self._relevance(i, out, rater_scores[i] if rater_scores is not None else None)
            for i in range(features.shape[0])
        ]
        return self.decide(features, questions, out.logits, relevance)

    @torch.no_grad()
    def decide(
        self,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        logits: torch.Tensor,
        relevance: list[torch.Tensor | None],
        mask: torch.Tensor | None = None,
        grids: list[tuple[int, int] | None] | None = None,
    ) -> list[UTSResult]:
        """Score, gate, pick tokens and encode, from an answer pass that already ran (no second forward).

        ``logits`` [B, V] are the first answer token's, or [B, T, V] a generated answer's (``mask`` [B, T] marks
        each row's tokens): the sequence is scored, the upload's top answers are its first token's.
        ``relevance[i]`` [N] ranks sample ``i``'s visual tokens (SparseVLM's rater scores of that pass, or the
        model's own attention/similarity). ``features`` may be one [N_i, D] per sample (dynamic resolution);
        ``grids[i]`` is sample ``i``'s token grid when not square (it travels with the upload).
        """
        unc = answer_uncertainty(logits, mask=mask)
        scores = uncertainty_score(unc, self.config.score)
        probs = torch.softmax((logits[:, 0] if logits.dim() == 3 else logits).float(), dim=-1)
        top = torch.topk(probs, min(self.config.top_answers, probs.shape[-1]), dim=-1)
        results = []
        for i in range(len(features)):
            score = float(scores[i])
            result = UTSResult(int(probs[i].argmax()), unc.row(i), score, sent=False)
            if score >= self.gate.threshold():
                idx = self.pick_tokens(features[i], relevance[i])
                grid = grids[i] if grids is not None else None
                sample = UploadSample(
                    features=features[i][idx].float().cpu(),
                    patch_indices=idx,
                    num_patches=int(features[i].shape[0]),
                    grid=tuple(grid) if grid is not None and grid[0] != grid[1] else None,
                    question=questions[i],
                    answer_ids=top.indices[i].cpu(),
                    answer_probs=top.values[i].cpu(),
                    uncertainty=unc.row(i),
                )
                payload = self.rates.encode(sample, self.gate)
                if self.gate.decide(score, len(payload)):
                    result.sent, result.payload, result.token_indices = True, payload, idx
            else:
                self.gate.decide(score, self.gate.mean_cost)
            results.append(result)
        return results


def frame_bytes(image: np.ndarray) -> int:
    """Bytes of the raw uint8 frame."""
    return int(image.nbytes)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> int:
    """Bytes of the frame as a JPEG at ``quality`` (what sending the picture instead would cost)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell()
