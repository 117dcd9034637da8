"""The device model at run time: base model (optionally quantized) + LoRA adapter slot + SparseVLM.

One forward per batch: the vision tower turns images into features, then projector + language model answer with
SparseVLM pruning visual tokens inside the language model. The same pass yields SparseVLM's rater scores, which
UTS uses to pick the visual tokens of an upload (no second pass). Longer answers continue from that pass's KV
cache (SparseVLM's pruned one when it is on), one token per step. Every supported family (LLaVA, Qwen2-VL: see
``common.mllm_family``) runs this same code.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict

from common.adapters import AdapterConfig, RowAdapters, add_lora, clone_adapter
from common.errors import ModelLoadError
from common.llava_tokens import PromptBuilder, answer_forward, greedy_continuations, unwrap_llava
from common.mllm_family import family_of
from common.modeling import load_mllm
from common.update_header import INITIAL_VERSION, UpdateError
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

DEFAULT_SLOT = "default"
"""peft's name for a model's first adapter: the one an agent of its own answers with."""


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
        self._lora_layers: list | None = None
        """The LoRA layers, found on the first forward with per-row slots (or the first added slot)."""
        self._slots: dict[str, dict[str, torch.Tensor]] = {}
        """Further adapter slots (``add_slot``): PEFT state names -> the slot's own tensors."""
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
    def adapter_weights(self, slot: str = DEFAULT_SLOT) -> dict[str, torch.Tensor]:
        """The adapter weights in ``slot`` (PEFT names) as fp32 CPU copies."""
        state = get_peft_model_state_dict(self.model) if not self._slots else self._slot(slot)
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    def install(self, adapter: AdapterState, slot: str = DEFAULT_SLOT) -> None:
        """Copy ``adapter`` into ``slot`` (callers do this between batches); the default slot is what ``forward``
        answers with unless told otherwise."""
        if not self._slots:
            if slot != DEFAULT_SLOT:
                raise UpdateError(f"no adapter slot {slot!r}")
            load_adapter_state(self.model, VersionedAdapter(adapter.version, adapter.state))
        else:
            params = self._slot(slot)
            if set(adapter.state) != set(params):
                odd = sorted(set(adapter.state) ^ set(params))
                raise UpdateError(f"adapter state does not fit slot {slot!r}: {odd[:3]}")
            with torch.no_grad():
                for key, param in params.items():
                    param.copy_(adapter.state[key].to(param.device, param.dtype))
        if slot == DEFAULT_SLOT:
            self.adapter = adapter

    def add_slot(self, slot: str) -> None:
        """A further adapter slot of the same LoRA shape, holding the default slot's weights (its version 0).

        Added layer by layer (``common.adapters.clone_adapter``) and read and written through each slot's own
        tensors from then on, so adding or swapping a slot costs the same whatever the number of slots (peft's
        model-level adapter functions walk every module of every adapter, and count unregistered slots as the
        default adapter's)."""
        if not self._slots:
            self._lora_layers = RowAdapters.layers_of(self.model)
            default = self._tensors(DEFAULT_SLOT)
            if set(default) != set(get_peft_model_state_dict(self.model)):
                raise UpdateError("the default adapter's tensors are not its LoRA layers' (peft names them otherwise)")
            self._slots[DEFAULT_SLOT] = default
        if slot in self._slots:
            raise ValueError(f"adapter slot {slot!r} exists")
        for _, layer in self._lora_layers or []:
            if DEFAULT_SLOT in layer.lora_A:
                clone_adapter(layer, DEFAULT_SLOT, slot)
        self._slots[slot] = self._tensors(slot)

    def _tensors(self, slot: str) -> dict[str, torch.Tensor]:
        """PEFT state names -> ``slot``'s own lora_A / lora_B weights."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self._lora_layers or []:
            if slot in layer.lora_A:
                out[f"{name}.lora_A.weight"] = layer.lora_A[slot].weight
                out[f"{name}.lora_B.weight"] = layer.lora_B[slot].weight
        return out

    def _slot(self, slot: str) -> dict[str, torch.Tensor]:
        try:
            return self._slots[slot]
        except KeyError:
            raise UpdateError(f"no adapter slot {slot!r}") from None

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
        adapters: RowAdapters | None = None,
    ):
        llava = unwrap_llava(self.model)
        before = sparse_stats(llava) if self.sparse is not None else None
        hook = (lambda mask: expect_image_mask(llava, mask)) if self.sparse is not None else None
        out = answer_forward(
            self.model, self.prompts, feats, questions, with_relevance=True, before_lm=hook, grids=grids,
            use_cache=use_cache, adapters=adapters,
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
        slots: list[str] | None = None,
    ) -> ForwardOut:
        """Answer every question on its frame's features with all visual tokens offered to the LM; ``slots[i]``
        names the adapter slot row ``i`` answers with (default: the default slot for every row)."""
        with self._rows(slots) as adapters:
            return self._answer(list(features), questions, grids, use_cache=False, adapters=adapters)[0]

    def _rows(self, slots: list[str] | None):
        """Per-row adapters for a batch of several slots' rows (none needed when every row is the default's)."""
        if slots is None or all(s == DEFAULT_SLOT for s in slots):
            return contextlib.nullcontext()
        if self._lora_layers is None:
            self._lora_layers = RowAdapters.layers_of(self.model)
        return RowAdapters(self._lora_layers, slots)

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor | list[torch.Tensor],
        questions: list[str],
        limits: list[int],
        grids: list[tuple[int, int] | None] | None = None,
        use_cache: bool = True,
        slots: list[str] | None = None,
    ) -> ForwardOut:
        """Greedy answers of up to ``limits[i]`` tokens, stopping a row at end-of-sequence (``slots`` as in
        ``forward``).

        The first step is ``forward``'s pass (SparseVLM's pruning, relevance and token counts come from it); each
        further token is one step on its KV cache (with SparseVLM, the pruned cache: the answer reads the visual
        tokens the prefill kept). ``use_cache=False`` re-runs the prefill on the prompt and the tokens so far
        instead (the reference; with SparseVLM its pruning decisions are based on the prompt's columns only, which
        matches the cached pass exactly when the rows' prompts are equally long).
        """
        with self._rows(slots) as adapters:
            return self._generate(list(features), questions, limits, grids, use_cache, adapters)

    def _generate(self, feats, questions, limits, grids, use_cache: bool, adapters: RowAdapters | None) -> ForwardOut:
        first, out = self._answer(feats, questions, grids, use_cache and max(limits) > 1, adapters)
        llava = unwrap_llava(self.model)
        hook = (lambda mask: expect_image_mask(llava, mask)) if self.sparse is not None else None
        args = (self.model, self.prompts, feats, questions)
        if use_cache or self.sparse is None:
            seqs, token_logits, mask = greedy_continuations(
                *args, out if use_cache else out.logits, limits, self.eos_id, hook, grids=grids, adapters=adapters
            )
        else:
            width = max(
                len(b) + int(f.shape[0]) + len(a) for f, (b, a) in zip(feats, map(self.prompts.split, questions))
            )
            with decision_prefix(llava, width):
                seqs, token_logits, mask = greedy_continuations(
                    *args, out.logits, limits, self.eos_id, hook, grids=grids, adapters=adapters
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
