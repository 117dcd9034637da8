"""The validation gate: is a candidate adapter state at least as good as the one the device holds?

Both states are scored on the subject's held-out uploads (never trained on) against the teacher's labels:
agreement = share of samples whose answer equals the teacher's. With one-token labels that is the first answer
token; with sequence labels it is a sequence exact match: the student, fed the teacher's answer (teacher forcing),
must choose the teacher's token at every position, end-of-sequence included (one wrong token fails the sample;
no partial credit per token). A candidate whose agreement is below the current state's by more than ``margin``
is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from cloud.akd import AKDTrainer, TeacherLabels
from common.llava_tokens import answer_forward, upload_positions
from common.sample_codec import UploadSample


@dataclass(frozen=True)
class GateReport:
    """What the gate measured and decided."""

    passed: bool
    held_out: int
    current_agreement: float
    candidate_agreement: float
    margin: float
    reason: str
    metric: str = "first token"
    """What agreement compared: ``first token`` or ``sequence exact match`` (teacher-forced, every token)."""

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def agreement(
    trainer: AKDTrainer, state: dict[str, torch.Tensor], samples: Sequence[UploadSample], labels: TeacherLabels
) -> float:
    """Share of ``samples`` on which the student with adapters ``state`` answers as the teacher does."""
    trainer.load_adapter_state(state)
    hits = 0
    bs = trainer.config.batch_size
    for i in range(0, len(samples), bs):
        chunk = samples[i : i + bs]
        feats, questions = [s.features for s in chunk], [s.question for s in chunk]
        if labels.is_sequence:
            part = labels.subset(range(i, i + len(chunk)))
            forced = [seq[:-1] for seq in part.sequences]  # type: ignore[union-attr]
            where = upload_positions(chunk)
            out = answer_forward(trainer.student, trainer.prompts, feats, questions, continuation=forced, **where)
            hits += int(sequences_agree(out.step_logits, part).sum())  # type: ignore[arg-type]
            continue
        out = answer_forward(trainer.student, trainer.prompts, feats, questions, **upload_positions(chunk))
        hits += int((out.logits.argmax(-1).cpu() == labels.answer_ids[i : i + bs].cpu()).sum())
    return hits / len(samples)


def sequences_agree(step_logits: torch.Tensor, labels: TeacherLabels) -> torch.Tensor:
    """[B] whether the student's choice at every teacher-forced position is the teacher's token there."""
    mask = labels.forced_mask
    width = step_logits.shape[1]
    targets = torch.tensor([s + [-1] * (width - len(s)) for s in labels.sequences])  # type: ignore[union-attr]
    same = step_logits.argmax(-1).cpu() == targets
    return (same | ~mask).all(dim=1)


def validate(
    trainer: AKDTrainer,
    current: dict[str, torch.Tensor],
    candidate: dict[str, torch.Tensor],
    samples: Sequence[UploadSample],
    labels: TeacherLabels,
    margin: float,
    min_held_out: int,
) -> GateReport:
    """Score ``current`` and ``candidate``; leaves the trainer holding ``candidate``."""
    metric = "sequence exact match" if labels.is_sequence else "first token"
    if len(samples) < min_held_out:
        trainer.load_adapter_state(candidate)
        reason = "too few held-out samples to judge"
        return GateReport(True, len(samples), float("nan"), float("nan"), margin, reason, metric)
    cur = agreement(trainer, current, samples, labels)
    cand = agreement(trainer, candidate, samples, labels)
    trainer.load_adapter_state(candidate)
    if cand < cur - margin:
        reason = f"candidate agrees with the teacher on {cand:.3f} of held-out uploads, current on {cur:.3f}"
        return GateReport(False, len(samples), cur, cand, margin, reason, metric)
    return GateReport(True, len(samples), cur, cand, margin, "candidate within margin", metric)
