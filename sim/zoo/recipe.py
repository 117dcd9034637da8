"""Zoo recipes: the geometry and sizes of the teacher / device pair and how they are trained.

The recipe's digest names the cache directory, so a changed recipe rebuilds and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import Field

from common.config import StrictConfig

# Bump when training code changes in a way that changes the weights a recipe produces.
RECIPE_CODE_VERSION = 1


class VisionSpec(StrictConfig):
    """CLIP vision tower (shared by teacher and device, frozen after pretraining)."""

    image_size: int = Field(96, ge=32)
    patch_size: int = Field(8, ge=2)
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class TextSpec(StrictConfig):
    """Llama language model of one zoo member."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384


class StageSpec(StrictConfig):
    """One training stage: steps, batch, peak learning rate."""

    steps: int = Field(600, ge=1)
    batch_size: int = Field(48, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(50, ge=0)
    # Questions per image, each seeing only the shared image prefix and itself (1 = plain single question).
    turns: int = Field(1, ge=1, le=8)
    # Share of the steps over which scenes grow from one object to the full five (0 disables the curriculum).
    curriculum: float = Field(0.0, ge=0.0, le=1.0)


class ZooRecipe(StrictConfig):
    """Everything that determines the zoo's weights."""

    name: str = "base"
    seed: int = 0
    vision: VisionSpec = VisionSpec()
    teacher: TextSpec = TextSpec()
    device: TextSpec = TextSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=192)
    vision_stage: StageSpec = StageSpec(steps=600, batch_size=64, lr=2e-3, warmup=40)
    teacher_stage: StageSpec = StageSpec(steps=1400, batch_size=16, lr=2e-3, warmup=60, turns=8)
    device_stage: StageSpec = StageSpec(steps=1200, batch_size=16, lr=2e-3, warmup=60, turns=8)
    # Vision pretraining sees clear images and shifts up to this severity (benchmark shifts are severity 1).
    vision_max_severity: float = Field(0.35, ge=0.0, le=1.0)
    # False builds the device model only (e.g. a geometry used only to benchmark the device).
    with_teacher: bool = True
    # Initialise each projector from the vision pretraining's per-patch heads (LLaVA's stage-1 alignment, cheaply).
    projector_from_heads: bool = True
    # Severity range used when the teacher trains on shifted domains.
    teacher_min_severity: float = 0.4

    def digest(self) -> str:
        """Stable short hash of the recipe and the training code version."""
        blob = json.dumps({"recipe": self.model_dump(), "code": RECIPE_CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def micro_recipe(seed: int = 0) -> ZooRecipe:
    """A recipe that builds in seconds, for tests (32 px images, 16 visual tokens, a few steps)."""
    return ZooRecipe(
        name="micro",
        seed=seed,
        vision=VisionSpec(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        teacher=TextSpec(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=96),
        device=TextSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
        vision_stage=StageSpec(steps=4, batch_size=8, lr=3e-3, warmup=1),
        teacher_stage=StageSpec(steps=6, batch_size=8, lr=3e-3, warmup=1, turns=4),
        device_stage=StageSpec(steps=6, batch_size=8, lr=3e-3, warmup=1, turns=4),
    )


def base576_recipe(seed: int = 0) -> ZooRecipe:
    """A device model with LLaVA-1.5's 576-visual-token count (96 px, patch 4), for token-pruning benchmarks."""
    return ZooRecipe(
        name="base576",
        seed=seed,
        vision=VisionSpec(image_size=96, patch_size=4),
        with_teacher=False,
        vision_stage=StageSpec(steps=400, batch_size=32, lr=2e-3, warmup=30),
        device_stage=StageSpec(steps=900, batch_size=8, lr=2e-3, warmup=50, turns=8),
    )


RECIPES = {"base": ZooRecipe, "micro": micro_recipe, "base576": base576_recipe}
