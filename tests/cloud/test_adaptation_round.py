"""The per-round class on the micro zoo, in-process: AKD -> gate -> DWC, device apply, state on disk, rebase."""

from __future__ import annotations

import pytest
import torch

from cloud.adaptation.state import LearnerStore, StateError
from cloud.adaptation.worker import LocalLabeler, Worker
from cloud.akd import TeacherLabels, build_student
from cloud.akd.student import adapter_state
from common.delta_codec import state_digest
from common.sample_codec import decode_sample
from common.update_header import UpdateError
from device.update_apply import VersionedAdapter, apply_adapter_update
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads


@pytest.fixture(scope="module")
def setup(micro_zoo, tmp_path_factory):
    cfg = adaptation_config(micro_zoo)
    labeler = LocalLabeler(cfg)
    worker = Worker(cfg, tmp_path_factory.mktemp("state"), labeler)
    payloads = make_uploads(micro_zoo, 48)
    samples = [decode_sample(p) for p in payloads]
    labels = labeler.label(FAMILY, payloads, samples)
    return cfg, worker, payloads, samples, labels


def _learner(setup):
    cfg, worker, payloads, samples, labels = setup
    learner = worker.build_learner(FAMILY)
    learner.add_held_out(payloads[:16], samples[:16], labels.subset(range(16)))
    return learner


def _round(setup, learner, labels=None, **kw):
    _, _, payloads, samples, all_labels = setup
    train = all_labels.subset(range(16, 48)) if labels is None else labels
    return learner.run_round(payloads[16:], samples[16:], train, margin=0.05, min_held_out=2, **kw)


def test_round_update_applies_on_the_device_bit_exactly(setup, micro_zoo):
    cfg, worker, *_ = setup
    learner = _learner(setup)
    # The device builds its v0 adapters from the same seed and LoRA shape: identical to the cloud's mirror.
    device_model, _ = worker._device_model(cfg.families[FAMILY])
    device = VersionedAdapter("v0", adapter_state(build_student(device_model, cfg.akd_config().adapter)))
    assert device.digest() == learner.mirror_digest()
    for expected in ("v1", "v2"):
        result = _round(setup, learner)
        assert result.outcome == "published" and result.gate.passed
        assert result.update.header.target_version == expected
        device = apply_adapter_update(device, result.update.payload, result.update.header)
        learner.commit(result.update)
        assert device.version == learner.mirror.version == expected
        assert device.digest() == learner.mirror_digest()
    assert len(learner.replay) == 64  # both rounds' uploads are kept for replay


def test_gate_refuses_a_candidate_trained_on_wrong_labels(setup):
    *_, labels = setup
    learner = _learner(setup)
    before = state_digest(learner.adapters())
    right = labels.subset(range(16, 48))
    wrong = TeacherLabels(torch.roll(right.logits, 3, dims=1) * 20, right.hidden)  # every answer shifted
    result = _round(setup, learner, wrong)
    assert result.outcome == "refused" and result.update is None
    assert result.gate.candidate_agreement < result.gate.current_agreement - result.gate.margin
    assert "agrees with the teacher" in result.gate.reason
    # Nothing of the refused round stays: adapters restored, uploads not in the replay buffer.
    assert state_digest(learner.adapters()) == before and len(learner.replay) == 0
    assert _round(setup, learner).outcome == "published"  # the right labels pass afterwards


def test_learner_state_survives_a_restart_and_rebases_on_rollback(setup, tmp_path):
    cfg, worker, *_ = setup
    learner = _learner(setup)
    for _ in range(2):
        learner.commit(_round(setup, learner).update)
    store = LearnerStore(tmp_path)
    store.promote("device:d1", store.save("device:d1", learner, job_id=7))
    again = worker.build_learner(FAMILY)
    store.restore("device:d1", again)
    assert again.mirror.version == "v2" and again.mirror_digest() == learner.mirror_digest()
    assert state_digest(again.adapters()) == state_digest(learner.adapters())
    assert len(again.replay) == len(learner.replay) and len(again.held_out) == len(learner.held_out)
    opt_a, opt_b = learner.trainer.optimizer.state_dict(), again.trainer.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert all(torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"]) for i in opt_a["state"])
    # The device rolled back to v1: the mirror rebases, and the next version is v3, never v2 again.
    again.rebase("v1")
    assert again.mirror.version == "v1" and again.mirror_digest() == state_digest(learner.history["v1"])
    result = _round(setup, again)
    assert result.update.header.base_version == "v1" and result.update.header.target_version == "v3"
    with pytest.raises(UpdateError, match="not in the mirror's history"):
        again.rebase("v9")
    # A mirror file that drifted from its recorded digest is refused on restore.
    mirror_file = tmp_path / "learners" / "device" / "d1" / "mirror" / "v2.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(mirror_file))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(mirror_file))
    with pytest.raises(StateError, match="digest"):
        store.restore("device:d1", worker.build_learner(FAMILY))


def test_job_recipe_holds_out_by_seq_and_labels_held_out_first(setup):
    from cloud.adaptation.recipe import JobSettings, commit_update, run_job
    from cloud.adaptation.uploads import decode_uploads

    cfg, worker, payloads, *_ = setup
    learner = worker.build_learner(FAMILY)
    dim = decode_sample(payloads[0]).features.shape[1]
    # Seqs 7..30 (not starting at 1): held out are the multiples of 5, whatever their position in the job.
    decoded = decode_uploads([("dev", 7 + i, p, {}) for i, p in enumerate(payloads[:24])], FAMILY, dim)
    seen: list[list[int]] = []

    def label(ups):
        seen.append([u.seq for u in ups])
        return worker.labeler.label(FAMILY, [u.payload for u in ups], [u.sample for u in ups])

    job = run_job(learner, decoded, label, JobSettings(held_out_every=5, margin=0.05, min_held_out=2))
    assert [u.seq for u in job.held] == [10, 15, 20, 25, 30]
    assert seen == [[10, 15, 20, 25, 30] + [s for s in range(7, 31) if s % 5]]
    assert len(learner.held_out) == 5 and job.result is not None and job.result.trained_on == 19
    assert job.outcome == "published" and job.update is not None
    assert commit_update(learner, job.update) == learner.mirror_digest() and learner.mirror.version == "v1"
    # Only held-out seqs: nothing to train on, the gate's set grows.
    only = decode_uploads([("dev", 35, payloads[30], {}), ("dev", 40, payloads[31], {})], FAMILY, dim)
    again = run_job(learner, only, label, JobSettings(held_out_every=5))
    assert again.outcome == "held out" and again.result is None and len(learner.held_out) == 7
