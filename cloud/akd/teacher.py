"""Teacher soft labels for uploaded samples: the teacher projects the device's selected tower features with
its own projector (the tower is shared) and answers from those tokens only.

With ``max_new_tokens`` > 1 the teacher answers greedily in full (``common.llava_tokens.greedy_continuations``)
and the labels carry its answer sequence and the logits of every step, for teacher-forced distillation; with 1
(the zoo's one-word answers) they hold the first answer token's logits only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.llava_tokens import (
    PromptBuilder,
    answer_forward,
    greedy_continuations,
    unwrap_llava,
    upload_positions,
)
from common.sample_codec import UploadSample


@dataclass
class LabelRow:
    """One sample's labels: first-token logits [V], hidden [H]; with a sequence, its ids and the logits that chose
    each of them [len(sequence), V]."""

    logits: torch.Tensor
    hidden: torch.Tensor
    sequence: list[int] | None = None
    steps: torch.Tensor | None = None


@dataclass
class TeacherLabels:
    """Teacher outputs at the answer position: logits [B, V], last hidden state [B, H], pseudo-answers [B].

    Sequence labels add ``sequences[i]`` (the teacher's answer ids, end-of-sequence included when emitted) and
    ``step_logits`` [B, T, V] (the logits that chose each of them; rows shorter than T are zero-padded).
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    sequences: list[list[int]] | None = None
    step_logits: torch.Tensor | None = None

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    @property
    def confidence(self) -> torch.Tensor:
        """The teacher's sequence confidence (product of its tokens' top-1 probabilities)."""
        if self.step_logits is None:
            return torch.softmax(self.logits.float(), dim=-1).amax(dim=-1)
        top = torch.softmax(self.step_logits.float(), dim=-1).amax(dim=-1)
        return top.masked_fill(~self.forced_mask.to(top.device), 1.0).prod(dim=1)

    @property
    def forced_mask(self) -> torch.Tensor:
        """[B, T]: every token of each row's sequence, end-of-sequence included (what teacher forcing predicts)."""
        assert self.sequences is not None and self.step_logits is not None
        lengths = torch.tensor([len(s) for s in self.sequences])
        return torch.arange(self.step_logits.shape[1])[None] < lengths[:, None]

    @property
    def is_sequence(self) -> bool:
        return self.sequences is not None and any(len(s) > 1 for s in self.sequences)

    def subset(self, index: torch.Tensor | Sequence[int]) -> TeacherLabels:
        idx = torch.as_tensor(index, dtype=torch.long)
        if self.sequences is None or self.step_logits is None:
            return TeacherLabels(self.logits[idx], self.hidden[idx])
        seqs = [self.sequences[i] for i in idx.tolist()]
        width = max((len(s) for s in seqs), default=0)  # an empty subset (a job that holds nothing out) is fine
        return TeacherLabels(self.logits[idx], self.hidden[idx], seqs, self.step_logits[idx, :width])

    def to(self, device: torch.device | str) -> TeacherLabels:
        """The same labels on ``device``."""
        steps = self.step_logits.to(device) if self.step_logits is not None else None
        return TeacherLabels(self.logits.to(device), self.hidden.to(device), self.sequences, steps)

    def row(self, i: int) -> LabelRow:
        """Sample ``i``'s labels (CPU copies; the sequence's step logits without padding)."""
        logits, hidden = self.logits[i].detach().cpu(), self.hidden[i].detach().cpu()
        if self.sequences is None or self.step_logits is None:
            return LabelRow(logits, hidden)
        seq = list(self.sequences[i])
        return LabelRow(logits, hidden, seq, self.step_logits[i, : len(seq)].detach().cpu())

    @classmethod
    def from_rows(cls, rows: Sequence[LabelRow]) -> TeacherLabels:
        """Stack rows; when any has a sequence, a row without one counts as the 1-token sequence of its argmax."""
        logits = torch.stack([r.logits for r in rows])
        hidden = torch.stack([r.hidden for r in rows])
        if all(r.sequence is None for r in rows):
            return cls(logits, hidden)
        seqs = [r.sequence if r.sequence is not None else [int(r.logits.argmax())] for r in rows]
        steps = [r.steps if r.steps is not None else r.logits[None] for r in rows]
        width = max(len(s) for s in seqs)
        padded = torch.stack([F.pad(s.float(), (0, 0, 0, width - s.shape[0])) for s in steps])
        return cls(logits, hidden, seqs, padded)


@torch.no_grad()
def teacher_labels(
    teacher: torch.nn.Module,
    prompts: PromptBuilder,
    samples: Sequence[UploadSample],
    batch_size: int = 64,
    max_new_tokens: int = 1,
) -> TeacherLabels:
    """Soft labels for every sample (batched); with ``max_new_tokens`` > 1 the teacher's greedy answer sequences
    too. ValueError on an empty batch."""
    if len(samples) == 0:
        raise ValueError("no samples to label (empty batch)")
    eos = getattr(prompts.tokenizer, "eos_token_id", None)
    logits, hidden, seqs, steps = [], [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        feats, questions = [s.features for s in chunk], [s.question for s in chunk]
        where = upload_positions(chunk)
        out = answer_forward(teacher, prompts, feats, questions, **where, use_cache=max_new_tokens > 1)
        logits.append(out.logits.float().cpu())
        hidden.append(out.hidden.float().cpu())
        if max_new_tokens > 1:
            s, step, _ = greedy_continuations(
                teacher, prompts, feats, questions, out, [max_new_tokens] * len(chunk), eos, **where
            )
            seqs += s
            steps.append(step.cpu())
    if max_new_tokens <= 1:
        return TeacherLabels(torch.cat(logits), torch.cat(hidden))
    width = max(x.shape[1] for x in steps)
    vocab = unwrap_llava(teacher).lm_head.out_features
    step_logits = torch.cat([F.pad(x, (0, 0, 0, width - x.shape[1])) for x in steps])
    assert step_logits.shape[-1] == vocab
    return TeacherLabels(torch.cat(logits), torch.cat(hidden), seqs, step_logits)
