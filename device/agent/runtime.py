"""The device model at run time: base model (optionally quantized) + LoRA adapter slot + SparseVLM.

One forward per batch: the vision tower turns images into features, then projector + language model answer with
SparseVLM pruning visual tokens inside the language model. The same pass yields SparseVLM's rater scores, which
UTS uses to pick the visual tokens of an upload (no second pass). Longer answers continue from that pass's KV
cache (SparseVLM's pruned one when it is on), one token per step. Every supported family (LLaVA, Qwen2-VL: see
``common.mllm_family``) runs this same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict

from common.adapters import AdapterConfig, add_lora
from common.errors import ModelLoadError
from common.llava_tokens import PromptBuilder, answer_forward, greedy_continuations, unwrap_llava
from common.mllm_family import family_of
from common.modeling import load_mllm
from common.update_header import INITIAL_VERSION
from device.agent.store import AdapterState
from device.sparse import (
    SparseConfig,
    decision_prefix,
    disable_sparsevlm,
    enable_sparsevlm,
    expect_image_mask,
    sparse_stats,
)
from device.update_apply import VersionedAdapter, load_adapter_state


@dataclass
class ForwardOut:
    """One batch's answer pass: first-answer-token logits [B, V], per-sample token relevance [N_i], and how many
    visual tokens the language model's last layer still held.

    After ``generate``: ``sequences[i]`` the answer's token ids (greedy; a final end-of-sequence id included),
    ``token_logits`` [B, T, V] the logits that chose each token and ``mask`` [B, T] each row's scored tokens (its
    tokens without the end-of-sequence one, unless that is all it has).
    """

    logits: torch.Tensor
    relevance: list[torch.Tensor | None]
    kept: list[int]
    total: list[int]
    sequences: list[list[int]] | None = None
    token_logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class DeviceModel:
    """A LLaVA- or Qwen2-VL-family model with one LoRA adapter slot and optional SparseVLM."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        adapter: AdapterConfig | None = None,
        sparse: SparseConfig | None = None,
        prompt_template: str | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        if not isinstance(model, PeftModel):
            model.requires_grad_(False)
            model = add_lora(model, adapter or AdapterConfig())
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        llava = unwrap_llava(self.model)
        self.family = family_of(self.model)
        self.prompts = PromptBuilder.for_model(self.model, self.tokenizer, prompt_template)
        self.sparse: SparseConfig | None = None
        self.set_sparse(sparse)
        self.adapter = AdapterState(INITIAL_VERSION, self.adapter_weights())
        stored = getattr(getattr(llava, "generation_config", None), "max_new_tokens", None)
        self.max_new_tokens = int(max_new_tokens or stored or 1)
        """Answer tokens when a frame names none: the config's, else the checkpoint's generation config's, else 1."""
        self.eos_id = self.tokenizer.eos_token_id

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        quantization: str = "none",
        device_map: str = "cpu",
        dtype: str = "auto",
        adapter: AdapterConfig | None = None,
        adapter_init: Path | None = None,
        sparse: SparseConfig | None = None,
        prompt_template: str | None = None,
        max_new_tokens: int | None = None,
    ) -> DeviceModel:
        """Load with ``common.modeling.load_mllm``; LoRA from ``adapter_init`` (PEFT directory) or fresh."""
        loaded = load_mllm(source, quantization=quantization, device_map=device_map, dtype=dtype)  # type: ignore[arg-type]
        model = loaded.model
        if quantization == "none" and device_map not in ("cpu", "auto"):
            model = model.to(device_map)
        model.requires_grad_(False)
        if adapter_init is not None:
            if not (Path(adapter_init) / "adapter_config.json").is_file():
                raise ModelLoadError(f"{adapter_init} is not a PEFT adapter directory (no adapter_config.json)")
            model = PeftModel.from_pretrained(model, str(adapter_init))
        return cls(model, loaded.processor, adapter, sparse, prompt_template, max_new_tokens)

    # -- configuration -------------------------------------------------------------------------------------
    def set_sparse(self, sparse: SparseConfig | None) -> None:
        """Turn SparseVLM on with ``sparse`` (or off with None / ``enabled: false``)."""
        llava = unwrap_llava(self.model)
        if sparse is not None and sparse.enabled:
            enable_sparsevlm(llava, sparse)
            self.sparse = sparse
        else:
            disable_sparsevlm(llava)
            self.sparse = None

    def peft_config(self) -> dict:
        """The adapter's LoraConfig as PEFT writes it to ``adapter_config.json``."""
        cfg = self.model.peft_config["default"]
        return json.loads(json.dumps(cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))

    @property
    def device(self) -> torch.device:
        return next(self.family.projector(self.model).parameters()).device

    # -- adapters ------------------------------------------------------------------------------------------
    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The installed adapter's weights (PEFT names) as fp32 CPU copies."""
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def install(self, adapter: AdapterState) -> None:
        """Copy ``adapter`` into the model (callers do this between batches)."""
        load_adapter_state(self.model, VersionedAdapter(adapter.version, adapter.state))
        self.adapter = adapter

    # -- the forward ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: list) -> tuple[list[torch.Tensor], list[tuple[int, int]] | None]:
        """Vision-tower features of uint8 HWC arrays or PIL images, one [N_i, D] per image, and each image's token
        grid (rows, columns; None for fixed-size square families). Qwen2-VL keeps each image's own resolution."""
        arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        pixels, grids = self.family.pixel_inputs(self.processor, arrays)
        return list(self.family.vision_features(self.model, pixels)), grids

    def features(self, images: list) -> torch.Tensor | list[torch.Tensor]:
        """Vision-tower features of the images: [B, N, D] when every image gives as many tokens (LLaVA, or
        Qwen2-VL frames of one size), else one [N_i, D] per image (see ``encode``)."""
        feats = self.encode(images)[0]
        return torch.stack(feats) if len({tuple(f.shape) for f in feats}) == 1 else feats

    def _answer(
        self,
        feats: list[torch.Tensor],
        questions: list[str],
        grids: list[tuple[int, int] | None] | None,
        use_cache: bool,
    ):
        llava = unwrap_llava(self.model)
        before = sparse_stats(llava) if self.sparse is not None else None
        hook = (lambda mask: expect_image_mask(llava, mask)) if self.sparse is not None else None
        out = answer_forward(
            self.model, self.prompts, feats, questions, with_relevance=True, before_lm=hook, grids=grids,
            use_cache=use_cache,
        )  # fmt: skip
        n = [int(f.shape[0]) for f in feats]
        stats = sparse_stats(llava) if self.sparse is not None else None
        if stats is before:  # the prefill fell back to dense (no visual tokens to prune): no fresh stats
            stats = None
        relevance: list[torch.Tensor | None] = []
        kept: list[int] = []
        for i in range(len(feats)):
            scores = stats.samples[i].visual_scores if stats is not None and i < len(stats.samples) else None
            if scores is not None and scores.numel() == n[i]:
                relevance.append(scores.detach().float().cpu())
            else:
                relevance.append(out.similarity[i].detach().float().cpu() if out.similarity is not None else None)
            kept.append(stats.samples[i].final_count if stats is not None and i < len(stats.samples) else n[i])
        return ForwardOut(out.logits.float(), relevance, kept, n), out

    @torch.no_grad()
    def forward(
        self,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        grids: list[tuple[int, int] | None] | None = None,
    ) -> ForwardOut:
        """Answer every question on its frame's features with all visual tokens offered to the LM."""
        return self._answer(list(features), questions, grids, use_cache=False)[0]

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        limits: list[int],
        grids: list[tuple[int, int] | None] | None = None,
        use_cache: bool = True,
    ) -> ForwardOut:
        """Greedy answers of up to ``limits[i]`` tokens, stopping a row at end-of-sequence.

        The first step is ``forward``'s pass (SparseVLM's pruning, relevance and token counts come from it); each
        further token is one step on its KV cache (with SparseVLM, the pruned cache: the answer reads the visual
        tokens the prefill kept). ``use_cache=False`` re-runs the prefill on the prompt and the tokens so far
        instead (the reference; with SparseVLM its pruning decisions are based on the prompt's columns only, which
        matches the cached pass exactly when the rows' prompts are equally long).
        """
        feats = list(features)
        first, out = self._answer(feats, questions, grids, use_cache=use_cache and max(limits) > 1)
        llava = unwrap_llava(self.model)
        hook = (lambda mask: expect_image_mask(llava, mask)) if self.sparse is not None else None
        args = (self.model, self.prompts, feats, questions)
        if use_cache or self.sparse is None:
            seqs, token_logits, mask = greedy_continuations(
                *args, out if use_cache else out.logits, limits, self.eos_id, hook, grids=grids
            )
        else:
            width = max(
                len(b) + int(f.shape[0]) + len(a) for f, (b, a) in zip(feats, map(self.prompts.split, questions))
            )
            with decision_prefix(llava, width):
                seqs, token_logits, mask = greedy_continuations(
                    *args, out.logits, limits, self.eos_id, hook, grids=grids
                )
        first.sequences, first.token_logits, first.mask = seqs, token_logits, mask
        return first

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]).strip()

    def decode_answer(self, ids: list[int]) -> str:
        """An answer's text: its tokens without end-of-sequence (a lone token decodes as ``decode`` does)."""
        if len(ids) == 1:
            return self.decode(ids[0])
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()
