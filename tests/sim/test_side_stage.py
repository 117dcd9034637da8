"""Training the device stage in a second process gives the same zoo as training it after the teacher."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sim.zoo.architecture import build_llava
from sim.zoo.build import ensure_zoo
from sim.zoo.recipe import micro_recipe
from sim.zoo.side_stage import SideStage, SideStageError


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
