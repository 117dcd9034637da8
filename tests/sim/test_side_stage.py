"""Training the device stage in a second process gives the same zoo as training it after the teacher."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.build import ensure_zoo
from sim.zoo.recipe import micro_recipe
from sim.zoo.side_stage import SideStage, SideStageError
from sim.zoo.tokenizer import build_processor


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_side_by_side_build_equals_one_by_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the side-by-side build trains each stage on one thread
    try:
        one = ensure_zoo(micro_recipe(), home=tmp_path / "one", progress=False, side_by_side=False)
        side = ensure_zoo(micro_recipe(), home=tmp_path / "side", progress=False, side_by_side=True)
    finally:
        torch.set_num_threads(threads)
    manifest = side.manifest()
    assert manifest["side_by_side"] and not one.manifest()["side_by_side"]
    assert set(manifest["seconds"]) == {"vision", "teacher (all)", "device (clear)"}
    assert manifest["seconds"]["device (clear)"] > 0
    assert manifest["final_loss"]["device (clear)"] == one.manifest()["final_loss"]["device (clear)"]
    for member in ("teacher", "device"):
        a, b = _weights(getattr(one, member)), _weights(getattr(side, member))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (member, name)


def test_a_failing_side_stage_raises_with_the_child_traceback():
    recipe = micro_recipe()
    teacher = build_llava(recipe.vision, recipe.teacher, 64, 1, 0, 0)  # not the device's geometry
    side = SideStage(
        teacher, recipe, "device", lambda step, loss: None, world_seed=0, shifted=False, min_severity=0.0, seed=0
    )
    with pytest.raises(SideStageError, match="Traceback"):
        side.join()
    with pytest.raises(SideStageError):  # the parent's own stage stops at its next step
        side.watching(lambda step, loss: None)(0, 0.0)


def test_a_finished_side_stage_trains_the_parents_tensors_and_reports_once():
    recipe = micro_recipe()
    v = recipe.vision
    processor = build_processor(v.image_size, v.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(v, recipe.device, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    before = {k: t.clone() for k, t in model.model.language_model.state_dict().items()}
    steps: list[int] = []
    side = SideStage(
        model, recipe, "device", lambda step, loss: steps.append(step), world_seed=2, shifted=False,
        min_severity=0.0, seed=2,
    )  # fmt: skip
    losses = side.join()
    assert len(losses) == recipe.device_stage.steps and steps == list(range(recipe.device_stage.steps))
    after = model.model.language_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained in place, seen by the parent
    done, seen = [], []
    watched = side.watching(lambda step, loss: seen.append(step), lambda: done.append(True))
    for step in range(3):
        watched(step, 0.0)
    assert done == [True] and seen == [0, 1, 2]
