"""The world's answers as training labels: what the true-label ceiling arms (offline experiment, fleet report)
train on in place of the teacher's pseudo-answers."""

from __future__ import annotations

import torch

from cloud.akd import TeacherLabels

TRUE_LOGIT = 30.0
"""Logit of the right answer in a true label (all others 0): at the distillation temperature it is one-hot."""


def true_labels(teacher_labels: TeacherLabels, answer_ids: torch.Tensor) -> TeacherLabels:
    """The world's answers as labels: one-hot logits on the right answer (so CE and KD both train towards it),
    the teacher's hidden state on the same tokens kept as the alignment target."""
    logits = torch.zeros_like(teacher_labels.logits)
    logits[torch.arange(len(answer_ids)), answer_ids] = TRUE_LOGIT
    return TeacherLabels(logits, teacher_labels.hidden)
