"""Compiled training of the zoo stages: the switch, the restore, and a compiled step that learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from sim.world import World
from sim.zoo import build
from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.compiling import compiled, compiler_available
from sim.zoo.recipe import StageSpec, micro_recipe
from sim.zoo.tokenizer import build_processor
from sim.zoo.train import answer_loss, train_answers


def test_compiling_without_a_compiler_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "compiler_available", lambda: False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        build.ensure_zoo(micro_recipe(), home=tmp_path, progress=False, compile_model=True)
    assert not any(tmp_path.iterdir())


def test_compiled_swaps_children_in_and_restores_them_even_on_error():
    parent = nn.Sequential()
    parent.add_module("a", nn.Linear(2, 2))
    plain = parent.a
    with compiled(parent, ("a",), True):
        assert parent.a is not plain and parent.a._orig_mod is plain
    assert parent.a is plain
    with pytest.raises(RuntimeError), compiled(parent, ("a",), True):
        raise RuntimeError("stage failed")
    assert parent.a is plain
    with compiled(parent, ("a",), False):
        assert parent.a is plain


@pytest.mark.skipif(not compiler_available(), reason="TorchInductor needs a C++ compiler")
def test_compiled_training_learns_and_leaves_a_plain_model():
    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(recipe.vision, recipe.device, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    world = World(0, 32)
    fixed = world.samples(0, 16)
    batch = encoder.encode([s.image for s in fixed], [s.question for s in fixed], [s.answer for s in fixed])
    answers = encoder.answer_ids([s.answer for s in fixed])
    with torch.no_grad():
        before = float(answer_loss(model, batch, answers, encoder.eos_id))
    train_answers(model, world, encoder, StageSpec(steps=25, batch_size=16, lr=3e-3, warmup=2),
                  shifted=False, min_severity=0.0, seed=0, compile_model=True)  # fmt: skip
    with torch.no_grad():
        after = float(answer_loss(model, batch, answers, encoder.eos_id))
    assert after < before - 0.5
    assert not any("_orig_mod" in name for name in model.state_dict())
