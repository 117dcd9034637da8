"""Raters: the visual-relevant text tokens, chosen from the text-visual relevance matrix (SparseVLM,
Sec. 3.2)."""

from __future__ import annotations

import math

import torch

NO_TEXT_AFTER_IMAGE = "no_text_after_image"
ALL_TEXT_RATERS = "all_text_raters"


def select_raters(
    embeds: torch.Tensor, visual_idx: torch.Tensor, text_idx: torch.Tensor, scaled: bool = True, strict: bool = False
) -> tuple[torch.Tensor, str | None]:
    """Indices (into ``embeds``) of the raters of one sample, and the fallback taken, if any.

    ``embeds`` [n, hidden] are the language model's input embeddings; ``text_idx`` the candidate text
    tokens (those
    after the image, which can attend to it). Relevance R = softmax_text(Hv Ht^T / sqrt(d)) [n_vis, n_text];
    r = mean of R over visual tokens; raters are the text tokens with r >= mean(r), so the set is never
    empty when
    there is any text after the image (the maximum is never below the mean). Fallbacks: no candidate text
    -> empty
    index and ``NO_TEXT_AFTER_IMAGE`` (the caller keeps every visual token); non-finite relevance -> every
    candidate rates (``ALL_TEXT_RATERS``). ``scaled=False, strict=True``: the released code's rule (no
    ``1/sqrt(d)``, ``r > mean(r)``; an empty set falls back to every candidate).
    """
    if text_idx.numel() == 0 or visual_idx.numel() == 0:
        return text_idx[:0], NO_TEXT_AFTER_IMAGE
    hv = embeds[visual_idx].float()
    ht = embeds[text_idx].float()
    logits = hv @ ht.T
    relevance = torch.softmax(logits / math.sqrt(embeds.shape[-1]) if scaled else logits, dim=-1)
    r = relevance.mean(dim=0)
    chosen = r > r.mean() if strict else r >= r.mean()
    if not torch.isfinite(r).all() or not bool(chosen.any()):
        return text_idx, ALL_TEXT_RATERS
    return text_idx[chosen], None
