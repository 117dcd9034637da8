"""The agent's answer path on Qwen2-VL: a small model built by the qwen2-vl-2b-shape recipe (its vocabulary, ids,
chat template, 2x2 merge and dynamic resolution; narrow widths for speed), loaded as checkpoints are.

Multi-token answers equal HF's own ``generate`` (dense and with SparseVLM, which hooks HF's generate the same
way), cached equals uncached, uploads carry their tokens' grid and the cloud labels and distils on them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.akd import AKDConfig, AKDTrainer, teacher_labels
from common.llava_tokens import PromptBuilder, answer_forward, unwrap_llava
from common.mllm_family import Qwen2VLFamily, family_of
from common.sample_codec import decode_sample
from device.agent.runtime import DeviceModel
from device.agent.step import DeviceStep, Frame
from device.sparse import SparseConfig
from device.uts import GateConfig, UncertaintyTokenSampler, UTSConfig
from sim.zoo.shapes import QWEN2_VL_2B, ShapeRecipe, TextShape, VisionShape, build_shape_member

TOKENS = 4
QUESTIONS = ["what color is the shape", "how many shapes are there"]


def small_qwen2_vl() -> ShapeRecipe:
    """The qwen2-vl-2b-shape recipe at a narrow width (vocabulary, ids and tower patching unchanged)."""
    vision = VisionShape(hidden_size=32, intermediate_size=64, num_heads=2, real_layers=1, out_hidden_size=64)
    text = QWEN2_VL_2B.text.model_dump() | dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
    device = QWEN2_VL_2B.model_copy(update={"vision": vision, "text": TextShape(**text), "label": "small"})
    return ShapeRecipe(name="qwen2-vl-small", device=device, lm_layers=2, tower_layers=1, device_dtype="float32")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> DeviceModel:
    root = tmp_path_factory.mktemp("qwen")
    build_shape_member(small_qwen2_vl(), root)
    dm = DeviceModel.load(root / "device")
    # a random model rarely emits end-of-sequence early; make sure answers run their full length
    dm.eos_id = -1
    return dm


def images() -> list[np.ndarray]:
    """A 112x112 frame (4x4 tokens) and an 84x112 one (3x4 tokens: dynamic resolution)."""
    gen = np.random.default_rng(0)
    return [gen.integers(0, 255, (112, 112, 3), dtype=np.uint8), gen.integers(0, 255, (84, 112, 3), dtype=np.uint8)]


def hf_generate(dm: DeviceModel, image: np.ndarray, question: str) -> tuple[list[int], torch.Tensor]:
    """HF's own greedy generate on the same prompt ids, pixels and grid: the tokens and each step's logits."""
    base = unwrap_llava(dm.model)
    enc = dm.processor.image_processor(images=[image], return_tensors="pt")
    n = int(enc["image_grid_thw"].prod()) // 4
    before, after = dm.prompts.split(question)
    ids = torch.tensor([before + [dm.prompts.image_token_id] * n + after])
    out = base.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
        image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=(ids == dm.prompts.image_token_id).int(),
        max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences[0, ids.shape[1] :].tolist(), torch.cat(out.logits)


def test_the_family_dispatch_reads_qwen2_vl(model):
    fam = family_of(model.model)
    assert isinstance(fam, Qwen2VLFamily) and model.family is fam
    feats, grids = model.encode(images())
    assert grids == [(4, 4), (3, 4)]
    assert [tuple(f.shape) for f in feats] == [(16, 4 * 32), (12, 4 * 32)]
    assert "<|im_start|>assistant" in model.prompts.template
    # M-RoPE: a subset of tokens keeps its positions in the full grid; text after the image starts past it
    full = fam.positions(3, (3, 4), None, 12, 2)
    part = fam.positions(3, (3, 4), torch.tensor([1, 6, 11]), 3, 2)
    assert torch.equal(part[:, 3:6], full[:, 3:15][:, [1, 6, 11]]) and torch.equal(part[:, 6:], full[:, 15:])
    assert full[:, 15].tolist() == [7, 7, 7]  # 3 + max(3, 4)


@pytest.mark.parametrize("sparse", [None, SparseConfig(budget=6)], ids=["dense", "sparsevlm"])
def test_multi_token_answers_equal_hf_generate(model, sparse):
    model.set_sparse(sparse)
    try:
        feats, grids = model.encode(images())
        batch = model.generate(feats, QUESTIONS, [TOKENS, TOKENS], grids)
        for i, image in enumerate(images()):
            tokens, logits = hf_generate(model, image, QUESTIONS[i])
            assert batch.sequences[i] == tokens
            assert torch.allclose(batch.token_logits[i], logits, atol=1e-4)  # every step, not only its argmax
            one = model.generate([feats[i]], [QUESTIONS[i]], [TOKENS], [grids[i]])
            assert one.sequences[0] == batch.sequences[i]
            uncached = model.generate([feats[i]], [QUESTIONS[i]], [TOKENS], [grids[i]], use_cache=False)
            assert uncached.sequences[0] == one.sequences[0]
            assert torch.allclose(uncached.token_logits, one.token_logits, atol=1e-4)
        if sparse is not None:
            assert batch.kept[0] < batch.total[0] == 16 and batch.kept[1] < batch.total[1] == 12
    finally:
        model.set_sparse(None)


def test_uploads_carry_their_grid_and_the_cloud_labels_and_distils_them(model):
    gate = GateConfig(budget=1000, expected_arrivals=1)
    step = DeviceStep(model, UncertaintyTokenSampler(UTSConfig(keep_ratio=0.5, min_tokens=2, gate=gate)))
    model.set_sparse(SparseConfig(budget=6))
    try:
        frames = [Frame(q, image=im, max_new_tokens=TOKENS) for q, im in zip(QUESTIONS, images(), strict=True)]
        answers = step.run(frames)
    finally:
        model.set_sparse(None)
    assert all(a.sent for a in answers) and all(len(a.token_ids) == TOKENS for a in answers)
    ups = [decode_sample(a.payload) for a in answers]
    assert ups[0].grid is None and ups[0].num_patches == 16  # square: no grid travels
    assert ups[1].grid == (3, 4) and ups[1].num_patches == 12
    # the cloud's teacher (here the device's own base) answers from the uploaded tokens at their grid positions
    base = unwrap_llava(model.model)
    prompts = PromptBuilder.for_model(base, model.tokenizer)
    labels = teacher_labels(base, prompts, ups, max_new_tokens=TOKENS)
    assert labels.is_sequence and all(len(s) <= TOKENS for s in labels.sequences)
    feats = [u.features for u in ups]
    line = [(1, len(f)) for f in feats]  # the same tokens in one row: other positions
    moved = answer_forward(base, prompts, feats, QUESTIONS, kept=[torch.arange(len(f)) for f in feats], grids=line)
    assert not torch.allclose(moved.logits, labels.logits)  # positions matter: the grid places each token
    trainer = AKDTrainer(base, base.config.text_config.hidden_size, prompts, AKDConfig(epochs=2, batch_size=2))
    report = trainer.train(ups, labels)
    assert report.steps == 2 and report.loss_after["ce"] < report.loss_before["ce"]
