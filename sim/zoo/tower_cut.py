"""Run a frozen LLaVA vision tower only up to the layer its projector reads.

LLaVA-1.5 feeds its projector the hidden state of vision layer -2, so every forward pass through the full tower
computes one layer whose output nobody uses. While the tower is frozen (the teacher and device stages of the zoo
build), :func:`tower_up_to_feature_layer` drops the unused top layers for the duration of a block and points the
model at the same hidden state by its positive index. The features, and so every loss and gradient, are the same
bits as with the full tower (tested); the model is whole again afterwards, so it saves and loads as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from transformers import LlavaForConditionalGeneration


def _tower_encoder(model: LlavaForConditionalGeneration) -> nn.Module:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder  # older transformers nest it one level deeper


def _feature_depth(model: LlavaForConditionalGeneration) -> int | None:
    """How many tower layers produce the feature layer (None when it cannot be cut: a list of layers)."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        return None
    total = len(_tower_encoder(model).layers)
    depth = layer if layer >= 0 else total + 1 + layer  # hidden_states[0] is the embeddings
    return depth if 1 <= depth <= total else None


@contextmanager
def tower_up_to_feature_layer(model: LlavaForConditionalGeneration) -> Iterator[None]:
    """Within the block, the tower runs only the layers up to the feature layer (a no-op when none is unused)."""
    depth = _feature_depth(model)
    encoder = _tower_encoder(model)
    if depth is None or depth == len(encoder.layers):
        yield
        return
    layers, layer = encoder.layers, model.config.vision_feature_layer
    try:
        encoder.layers = nn.ModuleList(list(layers)[:depth])
        model.config.vision_feature_layer = depth
        yield
    finally:
        encoder.layers = layers
        model.config.vision_feature_layer = layer
