"""Cutting the frozen tower at LLaVA's feature layer changes no bit of training, and leaves the model whole."""

from __future__ import annotations

import numpy as np
import torch

from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.recipe import VisionSpec, micro_recipe
from sim.zoo.tokenizer import build_processor
from sim.zoo.tower_cut import tower_up_to_feature_layer
from sim.zoo.train import question_set_loss


def _model_and_batch(feature_layer: int = -2):
    recipe = micro_recipe()
    vision = VisionSpec(**{**recipe.vision.model_dump(), "num_layers": 3})
    processor = build_processor(vision.image_size, vision.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(vision, recipe.teacher, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    model.config.vision_feature_layer = feature_layer
    model.model.vision_tower.requires_grad_(False)
    world = World(0, vision.image_size)
    samples = world.samples(0, 4, "night")
    sets = [[(s.question, s.answer)] + [(q, a) for _, q, a in world.extra_questions(s, 3)] for s in samples]
    return model, encoder.encode_question_sets([s.image for s in samples], sets)


def _loss_and_grads(model, batch, labels):
    model.zero_grad()
    loss = question_set_loss(model, batch, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _encoder_layers(model) -> int:
    return len(model.model.vision_tower.encoder.layers)


def test_cut_tower_gives_the_same_loss_and_gradients_bit_for_bit():
    model, (batch, labels) = _model_and_batch()
    full_loss, full_grads = _loss_and_grads(model, batch, labels)
    with tower_up_to_feature_layer(model):
        assert _encoder_layers(model) == 2  # layer -2 of 3 is the output of layer 2
        cut_loss, cut_grads = _loss_and_grads(model, batch, labels)
    assert torch.equal(full_loss, cut_loss)
    assert full_grads.keys() == cut_grads.keys()
    assert all(torch.equal(full_grads[n], cut_grads[n]) for n in full_grads)


def test_model_runs_whole_after_its_first_forward_was_cut():
    # transformers hooks the tower's layers at the first forward that asks for hidden states; made inside the block,
    # that would leave the dropped layer unhooked and the whole tower with no feature layer afterwards.
    model, (batch, labels) = _model_and_batch()
    with torch.no_grad():
        with tower_up_to_feature_layer(model):
            cut_logits = model(**batch).logits
        whole_logits = model(**batch).logits
    assert torch.equal(cut_logits, whole_logits)


def test_model_is_whole_again_after_the_block_even_on_error():
    model, _ = _model_and_batch()
    keys = set(model.state_dict())
    try:
        with tower_up_to_feature_layer(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _encoder_layers(model) == 3
    assert model.config.vision_feature_layer == -2
    assert set(model.state_dict()) == keys


def test_nothing_to_cut_when_the_last_layer_is_read():
    model, (batch, labels) = _model_and_batch(feature_layer=-1)
    with tower_up_to_feature_layer(model):
        assert _encoder_layers(model) == 3
        assert model.config.vision_feature_layer == -1


def test_fast_pixels_equal_the_numpy_formula_for_every_byte_value():
    processor = build_processor(32, 8)
    encoder = BatchEncoder.from_processor(processor)
    mean = np.asarray(processor.image_processor.image_mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(processor.image_processor.image_std, dtype=np.float32).reshape(1, 1, 1, 3)
    every_value = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), (2, 2, 3))  # 32 x 32 x 3
    images = [every_value] + [s.image for s in World(2, 32).samples(0, 3, "fog")]
    ref = (np.stack(images).astype(np.float32) * (1.0 / 255.0) - mean) / std
    assert torch.equal(encoder.pixels(images), torch.from_numpy(np.ascontiguousarray(ref.transpose(0, 3, 1, 2))))
