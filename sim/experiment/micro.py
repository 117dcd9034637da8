"""Randomly initialised micro teacher/device pairs (zoo geometry, seconds to build) for tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from common.llava_tokens import PromptBuilder
from sim.zoo.architecture import build_llava
from sim.zoo.recipe import ZooRecipe, micro_recipe
from sim.zoo.tokenizer import IMAGE_TOKEN, build_processor


@dataclass
class ModelPair:
    """Teacher and device sharing one vision tower, with their processor and prompt builder."""

    teacher: LlavaForConditionalGeneration
    device: LlavaForConditionalGeneration
    processor: LlavaProcessor
    prompts: PromptBuilder


def random_pair(recipe: ZooRecipe | None = None, seed: int = 0) -> ModelPair:
    """Untrained teacher + device of ``recipe``'s sizes (micro by default); the device reuses the teacher's
    vision tower weights, as in the zoo."""
    recipe = recipe or micro_recipe(seed)
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    teacher = build_llava(recipe.vision, recipe.teacher, len(tok), image_id, tok.pad_token_id, seed)
    device = build_llava(recipe.vision, recipe.device, len(tok), image_id, tok.pad_token_id, seed + 1)
    device.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    for m in (teacher, device):
        m.eval()
        m.requires_grad_(False)
    return ModelPair(teacher, device, processor, PromptBuilder(tok, image_id))


def pixel_batch(processor: LlavaProcessor, images: list) -> torch.Tensor:
    """CLIP-normalised pixel values for uint8 images."""
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
