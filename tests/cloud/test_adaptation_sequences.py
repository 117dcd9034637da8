"""The job recipe with sequence labels: a family that answers in several tokens is labelled with the teacher's
greedy answer sequence, the learner distils every token, the gate compares sequences, and the labels survive
the learner's state on disk. The zoo's one-word case (max_new_tokens 1) keeps its one-token labels."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cloud.adaptation.config import ModelFamily
from cloud.adaptation.recipe import JobSettings, feature_dim, run_job
from cloud.adaptation.state import LearnerStore
from cloud.adaptation.uploads import decode_uploads
from cloud.adaptation.worker import LocalLabeler, Worker
from cloud.akd import TeacherLabels
from common.sample_codec import decode_sample
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads

TOKENS = 3


def test_answer_tokens_come_from_the_family_or_the_device_models_generation_config(tmp_path):
    assert ModelFamily(device_model=str(tmp_path), max_new_tokens=4).answer_tokens() == 4
    assert ModelFamily(device_model=str(tmp_path)).answer_tokens() == 1  # no generation config: one token
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    assert ModelFamily(device_model=str(tmp_path)).answer_tokens() == 7
    assert ModelFamily(device_model="org/hub-id").answer_tokens() == 1


@pytest.fixture(scope="module")
def setup(micro_zoo, tmp_path_factory):
    family = ModelFamily(device_model=str(micro_zoo.device), teacher_model=str(micro_zoo.teacher))
    cfg = adaptation_config(micro_zoo, families={FAMILY: family.model_copy(update={"max_new_tokens": TOKENS})})
    worker = Worker(cfg, tmp_path_factory.mktemp("state"), LocalLabeler(cfg))
    payloads = make_uploads(micro_zoo, 40)
    rows = [("dev-1", i + 1, p, {}) for i, p in enumerate(payloads)]
    decoded = decode_uploads(rows, FAMILY, feature_dim(worker._device_model(family)[0]))
    return worker, decoded


def test_a_multi_token_family_is_labelled_distilled_and_gated_on_sequences(setup):
    worker, decoded = setup
    learner = worker.build_learner(FAMILY)
    settings = JobSettings(held_out_every=5, margin=1.0, min_held_out=2)
    job = run_job(learner, decoded, worker._label_fn(FAMILY), settings)
    labels = job.labels
    assert labels is not None and labels.is_sequence
    assert all(1 <= len(s) <= TOKENS for s in labels.sequences)
    assert labels.step_logits.shape[:2] == (len(decoded.uploads), max(len(s) for s in labels.sequences))
    result = job.result
    assert result is not None and result.gate.metric == "sequence exact match"
    # every token was distilled: the teacher-forced CE over the whole answer went down
    assert result.akd.loss_after["ce"] < result.akd.loss_before["ce"]
    # the replay and held-out buffers keep the sequences (the next round trains on them again)
    assert learner.replay.labels().sequences == labels.subset(range(len(job.held), len(labels.sequences))).sequences
    assert learner.held_out.labels().is_sequence
    empty = labels.subset([])  # a job whose uploads are all trained on holds out an empty subset
    assert empty.sequences == [] and empty.step_logits.shape[0] == 0


def test_a_job_that_holds_nothing_out_labels_and_trains_on_sequences(setup):
    worker, decoded = setup
    learner = worker.build_learner(FAMILY)
    few = dataclasses.replace(decoded, uploads=[u for u in decoded.uploads if u.seq % 5][:3])  # the fleet's 3
    job = run_job(learner, few, worker._label_fn(FAMILY), JobSettings(held_out_every=5, margin=1.0, min_held_out=2))
    assert not job.held and job.labels.is_sequence and job.result is not None


def test_sequence_labels_survive_the_learners_state_on_disk(setup, tmp_path):
    worker, decoded = setup
    learner = worker.build_learner(FAMILY)
    run_job(learner, decoded, worker._label_fn(FAMILY), JobSettings(held_out_every=5, margin=1.0, min_held_out=2))
    store = LearnerStore(tmp_path)
    store.promote("device:dev-1", store.save("device:dev-1", learner))
    again = worker.build_learner(FAMILY)
    store.restore("device:dev-1", again)
    for before, after in ((learner.replay, again.replay), (learner.held_out, again.held_out)):
        a, b = before.labels(), after.labels()
        assert a.sequences == b.sequences
        assert torch.equal(a.step_logits, b.step_logits) and torch.equal(a.logits, b.logits)


def test_mixed_rows_stack_with_one_token_rows_as_sequences_of_their_argmax():
    one = TeacherLabels(torch.tensor([[0.0, 2.0, 1.0]]), torch.zeros(1, 2))
    two = TeacherLabels(torch.zeros(1, 3), torch.zeros(1, 2), [[2, 0]], torch.randn(1, 2, 3))
    both = TeacherLabels.from_rows([one.row(0), two.row(0)])
    assert both.sequences == [[1], [2, 0]] and both.is_sequence
    assert torch.equal(both.step_logits[0, 0], one.logits[0]) and torch.equal(both.step_logits[0, 1], torch.zeros(3))
    assert torch.equal(both.step_logits[1], two.step_logits[0])
    assert TeacherLabels.from_rows([one.row(0)]).sequences is None  # one-token labels stay one-token


def test_the_zoos_one_word_family_keeps_one_token_labels(micro_zoo, tmp_path):
    cfg = adaptation_config(micro_zoo)  # the micro zoo's device has no max_new_tokens: one token
    assert cfg.families[FAMILY].answer_tokens() == 1
    payloads = make_uploads(micro_zoo, 4)
    labels = LocalLabeler(cfg).label(FAMILY, payloads, [decode_sample(p) for p in payloads])
    assert labels.sequences is None and not labels.is_sequence
