"""What a device does per frame, with no network: answer with the current adapters, then UTS.

``DeviceStep`` is the one implementation the agent, the fleet simulator and the offline experiment all drive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from device.agent.runtime import DeviceModel
from device.agent.store import AdapterState
from device.uts import UncertaintyTokenSampler, answer_uncertainty

SampleSink = Callable[[bytes, dict[str, str]], Any]
"""Receives each chosen sample (payload, metadata); returns e.g. the outbox seq."""


@dataclass
class Frame:
    """One question on one frame: an image (uint8 HWC array or PIL image) or its vision features [N, D]."""

    question: str
    image: Any = None
    features: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int | None = None
    """Answer tokens at most (None: the model's default, ``DeviceModel.max_new_tokens``)."""


@dataclass
class Answer:
    """The device's answer to one frame and what UTS decided (``answer_id``: its first token)."""

    answer: str
    answer_id: int
    confidence: float
    uncertainty: dict[str, float]
    score: float
    version: str
    kept_tokens: int
    total_tokens: int
    sent: bool = False
    payload: bytes | None = None
    seq: Any = None
    latency_s: float = 0.0
    tokens: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    token_confidences: list[float] = field(default_factory=list)


class DeviceStep:
    """Answer frames with the installed adapter; every answer goes through UTS (when given)."""

    def __init__(
        self,
        model: DeviceModel,
        uts: UncertaintyTokenSampler | None = None,
        sink: SampleSink | None = None,
    ) -> None:
        self.model = model
        self.uts = uts
        self.sink = sink

    @property
    def version(self) -> str:
        """The adapter version the next batch answers with."""
        return self.model.adapter.version

    def swap(self, adapter: AdapterState) -> None:
        """Install ``adapter``; call between batches only."""
        self.model.install(adapter)

    def run(self, frames: list[Frame]) -> list[Answer]:
        """Answer a batch of frames (images are run through the vision tower once, here)."""
        if not frames:
            return []
        need = [i for i, f in enumerate(frames) if f.features is None]
        feats: list[torch.Tensor | None] = [f.features for f in frames]
        grids: list[tuple[int, int] | None] = [None] * len(frames)
        if need:
            computed, computed_grids = self.model.encode([frames[i].image for i in need])
            for j, i in enumerate(need):
                feats[i] = computed[j]
                grids[i] = computed_grids[j] if computed_grids is not None else None
        on_device = [f.to(self.model.device) for f in feats]  # type: ignore[union-attr]
        same = len({tuple(f.shape) for f in on_device}) == 1
        batch = torch.stack(on_device) if same else on_device  # dynamic resolution: per-frame token counts
        limits = [f.max_new_tokens for f in frames]
        questions, meta = [f.question for f in frames], [f.metadata for f in frames]
        return self.run_features(batch, questions, meta, limits, grids if any(grids) else None)

    @torch.no_grad()
    def run_features(
        self,
        features: torch.Tensor,
        questions: list[str],
        metadata: list[dict[str, str]] | None = None,
        max_new_tokens: list[int | None] | None = None,
        grids: list[tuple[int, int] | None] | None = None,
    ) -> list[Answer]:
        """Answer from vision features [B, N, D] or one [N_i, D] per frame (the offline experiment's path);
        ``max_new_tokens[i]`` caps sample ``i``'s answer (None: the model's default); ``grids[i]`` is frame
        ``i``'s token grid when it is not square (Qwen2-VL's dynamic resolution)."""
        t0 = time.perf_counter()
        version = self.version
        default = self.model.max_new_tokens
        limits = [m or default for m in (max_new_tokens or [None] * len(questions))]
        if max(limits) > 1:
            out = self.model.generate(features, questions, limits, grids)
            logits, mask, seqs = out.token_logits, out.mask, out.sequences
        else:
            out = self.model.forward(features, questions, grids)
            logits, mask, seqs = out.logits, None, [[int(t)] for t in out.logits.argmax(-1).tolist()]
        decided = self.uts.decide(features, questions, logits, out.relevance, mask, grids) if self.uts else None
        unc = answer_uncertainty(logits, mask=mask)  # type: ignore[arg-type]
        elapsed = time.perf_counter() - t0
        answers = []
        for i, q in enumerate(questions):
            row = unc.row(i)
            ids = seqs[i]  # type: ignore[index]
            scored = int(mask[i].sum()) if mask is not None else 1
            a = Answer(
                answer=self.model.decode_answer(ids),
                answer_id=int(ids[0]),
                confidence=row["confidence"],
                uncertainty=row,
                score=decided[i].score if decided else 1.0 - row["confidence"],
                version=version,
                kept_tokens=out.kept[i],
                total_tokens=out.total[i],
                latency_s=elapsed,
                tokens=[self.model.decode(t) for t in ids[:scored]],
                token_ids=ids[:scored],
                token_confidences=[float(c) for c in unc.token_confidence[i, :scored]],
            )
            if decided and decided[i].sent:
                a.sent, a.payload = True, decided[i].payload
                if self.sink is not None:
                    meta = {"version": version, "question_chars": str(len(q))}
                    if metadata is not None:
                        meta.update(metadata[i])
                    a.seq = self.sink(decided[i].payload, meta)  # type: ignore[arg-type]
            answers.append(a)
        return answers
