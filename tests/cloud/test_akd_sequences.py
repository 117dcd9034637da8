"""AKD and the gate on multi-token answers: the teacher's greedy sequence, teacher forcing, sequence agreement."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from cloud.adaptation.gate import agreement
from cloud.akd import AKDConfig, AKDTrainer, teacher_labels
from common.llava_tokens import answer_forward, vision_features
from common.sample_codec import UploadSample, decode_sample, encode_sample
from sim.experiment.micro import pixel_batch, random_pair
from sim.world import World


@pytest.fixture(scope="module")
def setup():
    pair = random_pair()
    samples = World(0, 32).samples(0, 12, "dusk")
    feats = vision_features(pair.device, pixel_batch(pair.processor, [s.image for s in samples]))
    uploads = []
    for s, f in zip(samples, feats, strict=True):
        idx = torch.arange(0, f.shape[0], 2)
        up = UploadSample(f[idx], idx, f.shape[0], s.question, torch.tensor([1]), torch.tensor([0.5]))
        uploads.append(decode_sample(encode_sample(up)))
    return pair, uploads, teacher_labels(pair.teacher, pair.prompts, uploads, batch_size=5, max_new_tokens=4)


def test_teacher_labels_hold_its_greedy_answer(setup):
    pair, uploads, labels = setup
    assert labels.is_sequence and len(labels.sequences) == len(uploads)
    assert all(1 <= len(s) <= 4 for s in labels.sequences)
    assert labels.answer_ids.tolist() == [s[0] for s in labels.sequences]
    i = max(range(len(uploads)), key=lambda j: len(labels.sequences[j]))
    seq = labels.sequences[i]
    for t in range(1, len(seq)):  # every token is the teacher's argmax after the ones before it
        out = answer_forward(
            pair.teacher, pair.prompts, [uploads[i].features], [uploads[i].question], continuation=[seq[:t]]
        )
        assert int(out.logits.argmax(-1)) == seq[t]
    top = torch.softmax(labels.step_logits[i, : len(seq)], -1).amax(-1)
    assert math.isclose(float(labels.confidence[i]), float(top.prod()), rel_tol=1e-5)
    one = teacher_labels(pair.teacher, pair.prompts, uploads[:3])
    assert not one.is_sequence and one.sequences is None  # the zoo's one-token case is unchanged


def test_sequence_distillation_trains_and_the_gate_compares_sequences(setup):
    pair, uploads, labels = setup
    trainer = AKDTrainer(pair.device, pair.teacher.config.text_config.hidden_size, pair.prompts,
                         AKDConfig(epochs=8, batch_size=6, lr=5e-3))  # fmt: skip
    start = trainer.adapter_state()
    before = agreement(trainer, start, uploads, labels)
    report = trainer.train(uploads, labels)
    assert report.loss_after["ce"] < report.loss_before["ce"] and math.isfinite(report.loss_after["kd"])
    after = agreement(trainer, trainer.adapter_state(), uploads, labels)
    assert after > before


def test_the_teacher_agrees_with_itself_on_every_token_and_a_changed_token_disagrees(setup):
    pair, uploads, labels = setup
    same = AKDTrainer(pair.teacher, pair.teacher.config.text_config.hidden_size, pair.prompts, AKDConfig())
    state = same.adapter_state()  # LoRA starts at zero: the student answers exactly as the teacher
    assert agreement(same, state, uploads, labels) == 1.0
    i = max(range(len(uploads)), key=lambda j: len(labels.sequences[j]))
    assert len(labels.sequences[i]) > 1
    changed = [list(s) for s in labels.sequences]
    changed[i][-1] = (changed[i][-1] + 1) % 10  # the last token of one answer differs
    wrong = dataclasses.replace(labels, sequences=changed)
    assert agreement(same, state, uploads, wrong) == pytest.approx(1 - 1 / len(uploads))


def test_a_half_precision_student_distils(setup):
    """The shape members store fp16 (device) and bf16 (teacher) weights, and the trainer loads them as stored: the
    loss terms run in fp32 beside them (the first shape-member fleet run failed every job on a Half/Float mix)."""
    pair, uploads, labels = setup
    student = copy.deepcopy(pair.device).half()
    trainer = AKDTrainer(student, pair.teacher.config.text_config.hidden_size, pair.prompts,
                         AKDConfig(epochs=1, batch_size=6))  # fmt: skip
    report = trainer.train(uploads, labels)
    assert math.isfinite(report.loss_after["total"]) and report.steps == 2
