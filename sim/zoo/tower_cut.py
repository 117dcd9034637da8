"""Run a frozen LLaVA vision tower only up to the layer its projector reads.

LLaVA-1.5 feeds its projector the hidden state of vision layer -2, so every forward pass through the full tower
computes one layer whose output nobody uses. While the tower is frozen (the teacher and device stages of the zoo
build), :func:`tower_up_to_feature_layer` drops the unused top layers for the duration of a block and points the
model at the same hidden state by its positive index. The features, and so every loss and gradient, are the same
bits as with the full tower (tested); the model is whole again afterwards, so it saves, loads and runs as before.

transformers (5.x) collects hidden states through forward hooks it installs on the tower's layers at the first
forward pass that asks for them. Were that pass made inside the block, the dropped layers would never be hooked and
the whole tower would afterwards return no feature layer; so the block first runs the whole tower once on one blank
image, which installs the hooks on every layer (a no-op for the outputs: nothing is trained or cached).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
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


@torch.no_grad()
def _install_output_hooks(model: LlavaForConditionalGeneration) -> None:
    """One forward pass of the whole tower asking for hidden states (see the module docstring)."""
    tower = model.model.vision_tower
    side = tower.config.image_size
    param = next(tower.parameters())
    tower(pixel_values=torch.zeros(1, 3, side, side, dtype=param.dtype, device=param.device), output_hidden_states=True)


@contextmanager
def tower_up_to_feature_layer(model: LlavaForConditionalGeneration) -> Iterator[None]:
    """Within the block, the tower runs only the layers up to the feature layer (a no-op when none is unused)."""
    depth = _feature_depth(model)
    encoder = _tower_encoder(model)
    if depth is None or depth == len(encoder.layers):
        yield
        return
    _install_output_hooks(model)
    layers, layer = encoder.layers, model.config.vision_feature_layer
    try:
        encoder.layers = nn.ModuleList(list(layers)[:depth])
        model.config.vision_feature_layer = depth
        yield
    finally:
        encoder.layers = layers
        model.config.vision_feature_layer = layer
