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


@dataclass
class Answer:
    """The device's answer to one frame and what UTS decided."""

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
        if need:
            computed = self.model.features([frames[i].image for i in need])
            for j, i in enumerate(need):
                feats[i] = computed[j]
        stacked = torch.stack([f.to(self.model.device) for f in feats])  # type: ignore[union-attr]
        return self.run_features(stacked, [f.question for f in frames], [f.metadata for f in frames])

    @torch.no_grad()
    def run_features(
        self, features: torch.Tensor, questions: list[str], metadata: list[dict[str, str]] | None = None
    ) -> list[Answer]:
        """Answer from vision features [B, N, D] (the offline experiment's path)."""
        t0 = time.perf_counter()
        version = self.version
        out = self.model.forward(features, questions)
        decided = self.uts.decide(features, questions, out.logits, out.relevance) if self.uts else None
        unc = answer_uncertainty(out.logits)
        answer_ids = out.logits.argmax(-1).tolist()
        elapsed = time.perf_counter() - t0
        answers = []
        for i, q in enumerate(questions):
            row = unc.row(i)
            a = Answer(
                answer=self.model.decode(answer_ids[i]),
                answer_id=int(answer_ids[i]),
                confidence=row["confidence"],
                uncertainty=row,
                score=decided[i].score if decided else 1.0 - row["confidence"],
                version=version,
                kept_tokens=out.kept[i],
                total_tokens=out.total[i],
                latency_s=elapsed,
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
