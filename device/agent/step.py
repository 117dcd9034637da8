"""What a device does per frame, with no network: answer with the current adapters, then UTS.

``DeviceStep`` is the one implementation the agent, the fleet simulator and the offline experiment all drive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from device.agent.runtime import DeviceModel, ForwardOut
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
class ModelPass:
    """A batch's model outputs before any agent decides on them: logits [B, V] (or [B, T, V] with ``mask``
    [B, T] for multi-token answers), each row's token ids, and the forward's seconds."""

    out: ForwardOut
    logits: torch.Tensor
    mask: torch.Tensor | None
    seqs: list[list[int]]
    elapsed_s: float
    grids: list[tuple[int, int] | None] | None = None

    def rows(self, index: list[int]) -> ModelPass:
        """The pass restricted to rows ``index`` (in that order)."""
        o = self.out
        pick = torch.tensor(index, dtype=torch.long)
        out = ForwardOut(
            o.logits[pick],
            [o.relevance[i] for i in index],
            [o.kept[i] for i in index],
            [o.total[i] for i in index],
        )
        mask = self.mask[pick] if self.mask is not None else None
        grids = [self.grids[i] for i in index] if self.grids is not None else None
        return ModelPass(out, self.logits[pick], mask, [self.seqs[i] for i in index], self.elapsed_s, grids)


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
        batch, grids = self.stack_features(frames)
        limits = [f.max_new_tokens for f in frames]
        questions, meta = [f.question for f in frames], [f.metadata for f in frames]
        return self.run_features(batch, questions, meta, limits, grids)

    def stack_features(
        self, frames: list[Frame]
    ) -> tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, int] | None] | None]:
        """The frames' vision features (given, or computed here in one tower pass): [B, N, D], or one [N_i, D] per
        frame when their token counts differ; and each frame's token grid when one is not square (else None)."""
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
        return batch, (grids if any(grids) else None)

    def run_features(
        self,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        metadata: list[dict[str, str]] | None = None,
        max_new_tokens: list[int | None] | None = None,
        grids: list[tuple[int, int] | None] | None = None,
    ) -> list[Answer]:
        """Answer from vision features [B, N, D] or one [N_i, D] per frame (the offline experiment's path);
        ``max_new_tokens[i]`` caps sample ``i``'s answer (None: the model's default); ``grids[i]`` is frame
        ``i``'s token grid when it is not square (Qwen2-VL's dynamic resolution)."""
        passed = self.model_pass(features, questions, max_new_tokens, grids=grids)
        return self.decide(passed, features, questions, metadata)

    @torch.no_grad()
    def model_pass(
        self,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        max_new_tokens: list[int | None] | None = None,
        slots: list[str] | None = None,
        grids: list[tuple[int, int] | None] | None = None,
    ) -> ModelPass:
        """The model's answers to a batch, before UTS; ``slots[i]``: the adapter slot row ``i`` answers with
        (a batch of several tenants' rows, ``device.agent.tenants``; default: the model's own adapter)."""
        t0 = time.perf_counter()
        default = self.model.max_new_tokens
        limits = [m or default for m in (max_new_tokens or [None] * len(questions))]
        extra = {} if slots is None else {"slots": slots}
        if max(limits) > 1:
            out = self.model.generate(features, questions, limits, grids, **extra)
            logits, mask, seqs = out.token_logits, out.mask, out.sequences
        else:
            out = self.model.forward(features, questions, grids, **extra)
            logits, mask, seqs = out.logits, None, [[int(t)] for t in out.logits.argmax(-1).tolist()]
        return ModelPass(out, logits, mask, seqs, time.perf_counter() - t0, grids)  # type: ignore[arg-type]

    @torch.no_grad()
    def decide(
        self,
        passed: ModelPass,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        metadata: list[dict[str, str]] | None = None,
    ) -> list[Answer]:
        """This agent's answers from a model pass over its rows: uncertainty, UTS's choice, the sink."""
        t0 = time.perf_counter()
        version = self.version
        out, logits, mask, seqs = passed.out, passed.logits, passed.mask, passed.seqs
        uts = self.uts
        decided = uts.decide(features, questions, logits, out.relevance, mask, passed.grids) if uts else None
        unc = answer_uncertainty(logits, mask=mask)  # type: ignore[arg-type]
        elapsed = passed.elapsed_s + time.perf_counter() - t0
        answers = []
        for i, q in enumerate(questions):
            row = unc.row(i)
            ids = seqs[i]
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
