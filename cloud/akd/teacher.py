"""Teacher soft labels for uploaded samples: the teacher projects the device's selected tower features with
its own projector (the tower is shared) and answers from those tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.llava_tokens import PromptBuilder, answer_forward
from common.sample_codec import UploadSample


@dataclass
class TeacherLabels:
    """Teacher outputs at the answer position: logits [B, V], last hidden state [B, H], pseudo-answers [B]."""

    logits: torch.Tensor
    hidden: torch.Tensor

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    @property
    def confidence(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=-1).amax(dim=-1)

    def subset(self, index: torch.Tensor | Sequence[int]) -> TeacherLabels:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TeacherLabels(self.logits[idx], self.hidden[idx])


@torch.no_grad()
def teacher_labels(
    teacher: torch.nn.Module, prompts: PromptBuilder, samples: Sequence[UploadSample], batch_size: int = 64
) -> TeacherLabels:
    """Soft labels for every sample (batched); ValueError on an empty batch."""
    if len(samples) == 0:
        raise ValueError("no samples to label (empty batch)")
    logits, hidden = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        out = answer_forward(teacher, prompts, [s.features for s in chunk], [s.question for s in chunk])
        logits.append(out.logits.float().cpu())
        hidden.append(out.hidden.float().cpu())
    return TeacherLabels(torch.cat(logits), torch.cat(hidden))
