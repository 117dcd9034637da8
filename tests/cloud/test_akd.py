"""AKD on micro models: KD loss drops, only adapters train, PEFT export loads, bad input refused."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from cloud.akd import AKDConfig, AKDError, AKDTrainer, teacher_labels
from cloud.akd.teacher import TeacherLabels
from common.delta_codec import state_digest
from common.llava_tokens import answer_forward, vision_features
from common.sample_codec import UploadSample, decode_sample, encode_sample
from sim.experiment.micro import pixel_batch, random_pair
from sim.world import World


@pytest.fixture(scope="module")
def setup():
    pair = random_pair()
    world = World(0, 32)
    samples = world.samples(0, 24, "dusk")
    feats = vision_features(pair.device, pixel_batch(pair.processor, [s.image for s in samples]))
    uploads = []
    for s, f in zip(samples, feats, strict=True):
        idx = torch.arange(0, f.shape[0], 2)
        up = UploadSample(f[idx], idx, f.shape[0], s.question, torch.tensor([1]), torch.tensor([0.5]))
        uploads.append(decode_sample(encode_sample(up)))  # exactly what the cloud sees
    labels = teacher_labels(pair.teacher, pair.prompts, uploads, batch_size=10)
    return pair, uploads, labels


def _trainer(pair, **kw):
    cfg = AKDConfig(epochs=kw.pop("epochs", 6), batch_size=8, lr=5e-3, **kw)
    return AKDTrainer(pair.device, pair.teacher.config.text_config.hidden_size, pair.prompts, cfg)


def test_micro_akd_lowers_kd_loss_and_trains_adapters_only(setup):
    pair, uploads, labels = setup
    device_before = {k: v.clone() for k, v in pair.device.state_dict().items()}
    sharp = TeacherLabels(labels.logits * 30, labels.hidden)  # an untrained teacher is nearly uniform
    trainer = _trainer(pair)
    initial = trainer.adapter_state()
    report = trainer.train(uploads, sharp)
    assert report.loss_after["kd"] < 0.97 * report.loss_before["kd"]
    assert report.loss_after["ce"] < report.loss_before["ce"]
    assert report.loss_after["total"] < report.loss_before["total"]
    after = trainer.adapter_state()
    assert set(after) == set(initial) and all("lora" in k for k in after)
    assert any("multi_modal_projector" in k for k in after) and any("language_model" in k for k in after)
    assert state_digest(after) != state_digest(initial)
    base = trainer.student.get_base_model()
    for name, p in base.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    for k, v in pair.device.state_dict().items():  # the device model itself is untouched
        assert torch.equal(v, device_before[k])


def test_peft_export_loads_and_reproduces_logits(setup, tmp_path):
    pair, uploads, labels = setup
    trainer = _trainer(pair, epochs=1)
    trainer.train(uploads, labels)
    path = trainer.export(tmp_path / "adapter")
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(__import__("copy").deepcopy(pair.device), str(path)).eval()
    feats, questions = [u.features for u in uploads[:4]], [u.question for u in uploads[:4]]
    with torch.no_grad():
        want = answer_forward(trainer.student, pair.prompts, feats, questions).logits
        got = answer_forward(loaded, pair.prompts, feats, questions).logits
        plain = answer_forward(pair.device, pair.prompts, feats, questions).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-4)


def test_bad_input_is_refused_without_state_change(setup):
    pair, uploads, labels = setup
    trainer = _trainer(pair, epochs=1)
    before = state_digest(trainer.adapter_state())
    with pytest.raises(AKDError, match="empty batch"):
        trainer.train([], labels.subset([]))
    with pytest.raises(ValueError, match="empty batch"):
        teacher_labels(pair.teacher, pair.prompts, [])
    with pytest.raises(AKDError, match="teacher labels for"):
        trainer.train(uploads[:3], labels)
    bad = TeacherLabels(labels.logits[:4].clone(), labels.hidden[:4].clone())
    bad.logits[0, 0] = float("nan")
    with pytest.raises(AKDError, match="NaN or inf"):
        trainer.train(uploads[:4], bad)
    with pytest.raises(AKDError, match="vocabulary"):
        trainer.train(uploads[:4], TeacherLabels(labels.logits[:4, :10], labels.hidden[:4]))
    assert state_digest(trainer.adapter_state()) == before


def test_diverging_loss_restores_adapters(setup):
    pair, uploads, labels = setup
    trainer = _trainer(pair, epochs=2)
    before = state_digest(trainer.adapter_state())
    huge = TeacherLabels(labels.logits, labels.hidden * 1e30)  # finite labels, the MSE overflows
    with pytest.raises(AKDError, match="NaN or inf"):
        trainer.train(uploads, huge)
    assert state_digest(trainer.adapter_state()) == before


def test_confidence_weighting_weighs_each_sample_by_the_teachers_confidence(setup):
    pair, uploads, labels = setup
    plain, weighted = _trainer(pair), _trainer(pair, confidence_weighting=True)
    batch, sub = uploads[:6], labels.subset(range(6))
    # Uniform confidence: the weighted loss is the plain loss.
    flat = TeacherLabels(torch.zeros_like(sub.logits), sub.hidden)
    flat.logits[:, 3] = 1.0
    same_p, same_w = plain.losses(batch, flat), weighted.losses(batch, flat)
    assert torch.allclose(same_p["ce"], same_w["ce"]) and torch.allclose(same_p["kd"], same_w["kd"])
    # One confident sample among near-uniform ones: the weighted CE is dominated by that sample's CE.
    peaked = TeacherLabels(torch.zeros_like(sub.logits), sub.hidden)
    peaked.logits[0, 3] = 40.0
    peaked.logits[1:, 3] = 1e-3
    with torch.no_grad():
        out = answer_forward(weighted.student, pair.prompts, [s.features for s in batch], [s.question for s in batch])
        per = torch.nn.functional.cross_entropy(out.logits, peaked.answer_ids, reduction="none")
        conf = peaked.confidence
        expected = (conf / conf.mean() * per).mean()
        assert torch.allclose(weighted.losses(batch, peaked)["ce"], expected, atol=1e-6)
        assert not torch.allclose(plain.losses(batch, peaked)["ce"], expected, atol=1e-4)
