"""Question bank: distinct questions, bounded capacity, pairing with other questions, confidence filter."""

from __future__ import annotations

import pytest
import torch

from cloud.akd.questions import QuestionBank, confident_subset
from cloud.akd.teacher import TeacherLabels
from common.sample_codec import UploadSample


def _sample(question: str) -> UploadSample:
    return UploadSample(torch.randn(3, 4), torch.tensor([0, 2, 5]), 9, question, torch.tensor([7]), torch.tensor([0.4]))


def test_bank_keeps_distinct_questions_up_to_capacity():
    bank = QuestionBank(capacity=3)
    bank.add(["a", "b", "a", "c"])
    assert len(bank) == 3
    bank.add(["a", "d"])  # "a" was refreshed, so "b" is the oldest and goes
    assert len(bank) == 3
    paired = bank.pair([_sample("zzz")], per_sample=5)
    assert sorted(s.question for s in paired) == ["a", "c", "d"]
    with pytest.raises(ValueError):
        QuestionBank(capacity=0)


def test_pairing_swaps_only_the_question_and_never_repeats_the_own_one():
    bank = QuestionBank(seed=1)
    bank.add([f"q{i}" for i in range(10)])
    samples = [_sample("q3"), _sample("q7")]
    paired = bank.pair(samples, per_sample=4)
    assert len(paired) == 8
    for k, sample in enumerate(samples):
        mine = paired[4 * k : 4 * k + 4]
        questions = [p.question for p in mine]
        assert sample.question not in questions and len(set(questions)) == 4
        for p in mine:
            assert torch.equal(p.features, sample.features) and torch.equal(p.patch_indices, sample.patch_indices)
            assert p.answer_ids.numel() == 0 and p.answer_probs.numel() == 0
    assert bank.pair(samples, per_sample=0) == []
    assert QuestionBank().pair(samples, per_sample=3) == []


def test_confident_subset_keeps_only_confident_teacher_answers():
    samples = [_sample(f"q{i}") for i in range(3)]
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 9.0]])
    labels = TeacherLabels(logits, torch.randn(3, 2))
    kept, kept_labels = confident_subset(samples, labels, floor=0.6)
    assert [s.question for s in kept] == ["q0", "q2"]
    assert torch.equal(kept_labels.logits, logits[[0, 2]])
