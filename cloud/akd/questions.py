"""More supervision per uploaded image: ask the teacher other devices' questions about it.

An upload carries one question, but its visual tokens answer many. The cloud keeps a bank of the questions it has
received and pairs each uploaded image with a few of them; the teacher answers those too, and the answers it is
confident about join the distillation set. This costs no uplink bytes and uses no ground truth: the questions
come from the uploads and the labels from the teacher.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from cloud.akd.teacher import TeacherLabels
from common.sample_codec import UploadSample


class QuestionBank:
    """Distinct questions seen in uploads (the oldest dropped beyond ``capacity``), drawn from at random."""

    def __init__(self, capacity: int = 4096, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("question bank capacity must be at least 1")
        self.capacity = capacity
        self._questions: OrderedDict[str, None] = OrderedDict()
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._questions)

    def add(self, questions: Iterable[str]) -> None:
        """Remember ``questions`` (a repeated one counts as new again, so it is kept longest)."""
        for q in questions:
            self._questions.pop(q, None)
            self._questions[q] = None
            if len(self._questions) > self.capacity:
                self._questions.popitem(last=False)

    def pair(self, samples: Sequence[UploadSample], per_sample: int) -> list[UploadSample]:
        """Up to ``per_sample`` copies of each sample, each with another distinct question from the bank.

        The copies carry no device answer (the device never saw those questions)."""
        if per_sample <= 0 or not self._questions:
            return []
        pool = list(self._questions)
        out: list[UploadSample] = []
        empty_ids, empty_probs = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        for sample in samples:
            others = [q for q in self._rng.sample(pool, min(len(pool), per_sample + 1)) if q != sample.question]
            for q in others[:per_sample]:
                out.append(replace(sample, question=q, answer_ids=empty_ids, answer_probs=empty_probs, uncertainty={}))
        return out


def confident_subset(
    samples: Sequence[UploadSample], labels: TeacherLabels, floor: float
) -> tuple[list[UploadSample], TeacherLabels]:
    """The samples whose teacher confidence (top answer probability) is at least ``floor``."""
    keep = torch.nonzero(labels.confidence >= floor).flatten().tolist()
    return [samples[i] for i in keep], labels.subset(keep)
