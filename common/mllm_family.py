"""What differs between the MLLM families on the answer path, behind one small interface.

Tandem answers from *vision-tower features* of selected visual tokens (the tower is frozen and shared by device and
teacher; the projector is each model's own). Two families differ in where that boundary lies and in positions:

- **LLaVA** (``LlavaForConditionalGeneration``): CLIP hidden states at ``vision_feature_layer`` (CLS dropped), one
  per patch, width D; the projector is ``multi_modal_projector``; positions are 1D and contiguous over the tokens
  the language model is fed (a subset of visual tokens is renumbered, as before).
- **Qwen2-VL** (``Qwen2VLForConditionalGeneration``): the ViT's last hidden states before the patch merger, grouped
  per visual token (its 2x2 merge unit: 4 x embed_dim wide, in the image processor's merge order); the projector
  is ``visual.merger``. Dynamic resolution: an image of H x W pixels gives a (H/28) x (W/28) token grid.
  Positions are M-RoPE [3, L] (temporal, row, column): a visual token keeps its original grid position whatever
  subset is fed (uploads, SparseVLM), and the text after the image starts at ``start + max(grid)``, as
  ``Qwen2VLModel.get_rope_index`` numbers a full image.

``family_of(model)`` picks the implementation from the model (or the PeftModel around it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common.errors import TandemError

LLAVA_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
QWEN2_VL_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)


class FamilyError(TandemError):
    """The model is of no supported family, or its visual inputs do not fit it."""


def unwrap(model: nn.Module) -> nn.Module:
    """The ``*ForConditionalGeneration`` inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class LlavaFamily:
    """LLaVA-1.5-style models: CLIP tower features, an MLP projector, 1D positions."""

    name = "llava"
    template = LLAVA_TEMPLATE
    image_placeholder = "<image>"
    position_dims = 1

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return unwrap(model).model.vision_tower

    @staticmethod
    def projector(model: nn.Module) -> nn.Module:
        return unwrap(model).model.multi_modal_projector

    def feature_dim(self, model: nn.Module) -> int:
        return int(self.projector(model).linear_1.in_features)

    def project(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        """Language-model embeddings [k, H] of tower features [k, D]."""
        proj = self.projector(model)
        param = next(proj.parameters())
        return proj(feats.to(param.device, param.dtype))

    def pixel_inputs(self, processor: Any, arrays: list) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """Pixel values of uint8 HWC arrays, and each image's token grid (None: every image is one fixed square)."""
        return processor.image_processor(images=arrays, return_tensors="pt")["pixel_values"], None

    def vision_features(self, model: nn.Module, pixels: Any) -> Any:
        """Tower hidden states at the feature layer, CLS dropped: [B, N, D]."""
        base = unwrap(model)
        cfg = base.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise FamilyError("only a single integer vision_feature_layer is supported")
        param = next(self.tower(model).parameters())
        out = self.tower(model)(pixels.to(param.device, param.dtype), output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats

    def positions(
        self, n_before: int, grid: tuple[int, int] | None, kept: torch.Tensor | None, n_visual: int, n_after: int
    ) -> torch.Tensor:
        """[1, L] contiguous positions over what the language model is fed."""
        return torch.arange(n_before + n_visual + n_after)[None]


class Qwen2VLFamily(LlavaFamily):
    """Qwen2-VL: ViT features per 2x2 merge unit, the patch merger as projector, M-RoPE positions."""

    name = "qwen2_vl"
    template = QWEN2_VL_TEMPLATE
    image_placeholder = "<|image_pad|>"
    position_dims = 3

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return unwrap(model).model.visual

    @staticmethod
    def projector(model: nn.Module) -> nn.Module:
        return unwrap(model).model.visual.merger

    def feature_dim(self, model: nn.Module) -> int:
        return int(self.projector(model).hidden_size)

    @staticmethod
    def merge(model: nn.Module) -> int:
        return int(unwrap(model).config.vision_config.spatial_merge_size)

    def project(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        merger = self.projector(model)
        param = next(merger.parameters())
        units = feats.to(param.device, param.dtype)
        return merger(units.reshape(-1, units.shape[-1] // self.merge(model) ** 2))

    def pixel_inputs(self, processor: Any, arrays: list) -> tuple[Any, list[tuple[int, int]] | None]:
        """Flattened patches and ``image_grid_thw`` (dynamic resolution); grids in visual tokens (after merging)."""
        enc = processor.image_processor(images=arrays, return_tensors="pt")
        thw = enc["image_grid_thw"]
        merge = int(getattr(processor.image_processor, "merge_size", 2))
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in thw.tolist()]
        return (enc["pixel_values"], thw), grids

    def vision_features(self, model: nn.Module, pixels: Any) -> Any:
        """The ViT's last hidden states before the merger, one [n_tokens, merge^2 * embed_dim] per image."""
        values, thw = pixels
        tower = self.tower(model)
        param = next(tower.parameters())
        out = tower(values.to(param.device, param.dtype), grid_thw=thw.to(param.device))
        hidden = out.last_hidden_state
        unit = self.merge(model) ** 2
        sizes = [int(t * h * w) for t, h, w in thw.tolist()]
        return [part.reshape(-1, unit * part.shape[-1]) for part in torch.split(hidden, sizes)]

    def positions(
        self, n_before: int, grid: tuple[int, int] | None, kept: torch.Tensor | None, n_visual: int, n_after: int
    ) -> torch.Tensor:
        """[3, L] M-RoPE positions: text 1D, each fed visual token at its original (row, column) of ``grid``
        (``kept``: the tokens' indices in the full row-major grid; None: all of them in order)."""
        idx = torch.arange(n_visual) if kept is None else kept.long().cpu()
        if grid is None:
            grid = square_grid(int(idx.max()) + 1 if kept is not None else n_visual)
        rows, cols = grid
        before = torch.arange(n_before)[None].expand(3, n_before)
        vis = torch.stack([torch.zeros_like(idx), idx // cols, idx % cols]) + n_before
        start = n_before + max(rows, cols)
        after = (torch.arange(n_after) + start)[None].expand(3, n_after)
        return torch.cat([before, vis, after], dim=1)


def square_grid(n: int) -> tuple[int, int]:
    """The square token grid of ``n`` tokens (a 336 x 336 frame); FamilyError when ``n`` is not a square."""
    side = math.isqrt(n)
    if side * side != n:
        raise FamilyError(f"{n} visual tokens without their grid: pass the grid (rows, columns) of a non-square image")
    return side, side


_FAMILIES: dict[str, LlavaFamily] = {
    "LlavaForConditionalGeneration": LlavaFamily(),
    "Qwen2VLForConditionalGeneration": Qwen2VLFamily(),
}


def family_of(model: nn.Module) -> LlavaFamily:
    """The family of ``model`` (a PeftModel is looked through); FamilyError naming the class otherwise."""
    cls = type(unwrap(model)).__name__
    if cls not in _FAMILIES:
        raise FamilyError(f"no answer path for model class {cls}; supported: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[cls]


def grids_or_none(grids: Sequence[tuple[int, int] | None] | None, n: int) -> list[tuple[int, int] | None]:
    """``grids`` as a list of ``n`` entries (None: every grid unknown)."""
    if grids is None:
        return [None] * n
    if len(grids) != n:
        raise FamilyError(f"{len(grids)} grids for {n} samples")
    return list(grids)
