"""Recovery against the teacher and the true-label ceiling: which steps are scored, and the shares."""

from __future__ import annotations

import pytest
import torch

from cloud.akd import TeacherLabels
from sim.experiment.recovery import MIN_GAP, per_shift, targets
from sim.experiment.runner import Row
from sim.experiment.truth import true_labels


def _rows(shift: str, first: int, none: float, teacher: float, tandem: list[float], ceiling: list[float]):
    rows = []
    for k, (t, c) in enumerate(zip(tandem, ceiling, strict=True)):
        x = first + k
        rows += [Row(x, shift, k + 1, "none", none), Row(x, shift, k + 1, "teacher", teacher)]
        rows += [Row(x, shift, k + 1, "tandem", t), Row(x, shift, k + 1, "ceiling", c)]
    return rows


def test_small_gaps_are_reported_but_not_scored():
    rows = _rows("clear", 1, 0.90, 0.90 + MIN_GAP / 2, [0.90, 0.89], [0.91, 0.91])
    rows += _rows("night", 3, 0.60, 0.90, [0.75, 0.81], [0.80, 0.84])
    shifts = per_shift(rows)
    assert [p["scored"] for p in shifts] == [False, True]
    night = shifts[1]
    assert night["recovery_end"] == pytest.approx(0.7)  # (81 - 60) / (90 - 60)
    assert night["ceiling_recovery_end"] == pytest.approx(0.8)
    assert night["share_of_ceiling_end"] == pytest.approx(0.875)  # 21 / 24
    (rec, share, margin) = targets(shifts)
    # clear (0% recovered, within noise) does not hide the real worst step.
    assert (rec[1], rec[2]) == ("70%", True)
    assert (share[1], share[2]) == ("88%", False)
    assert (margin[1], margin[2]) == ("-1.0 pt", True)


def test_true_labels_are_one_hot_on_the_worlds_answer_and_keep_the_teachers_hidden():
    teacher = TeacherLabels(torch.randn(3, 7), torch.randn(3, 5))
    truth = torch.tensor([4, 0, 6])
    labels = true_labels(teacher, truth)
    assert torch.equal(labels.answer_ids, truth) and bool((labels.confidence > 0.999).all())
    assert torch.equal(labels.hidden, teacher.hidden)
