"""Turn SparseVLM on and off on a LLaVA model; read what the last prefill did.

``enable_sparsevlm(model, cfg)`` stores ``cfg`` on ``model.config.sparsevlm`` (so ``save_pretrained`` keeps
it)
and routes the language model's forward through the sparse engine. With ``enabled=False`` (or after
``disable_sparsevlm``) the model's own forward runs untouched, so outputs are bit-identical to the dense
model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from device.sparse.adapters import DecoderAdapter, adapter_for, new_cache, pop_cache
from device.sparse.config import SparseConfig
from device.sparse.engine import CACHE_STATE_ATTR, SparsePrefill, sparse_decode
from device.sparse.stats import SparseStats

RUNTIME_ATTR = "_tandem_sparse"


class SparseRuntime:
    """Per-model state: config, adapter, the image mask of the call in flight, last stats."""

    def __init__(self, cfg: SparseConfig, adapter: DecoderAdapter) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.pending_image_mask: torch.Tensor | None = None
        self.decision_length: int | None = None
        self.last_stats: SparseStats | None = None
        self.hook: Any = None
        self.vision_hook: Any = None
        self.targets_cache: dict[int, list[int]] = {}  # budget counts of ``cfg`` (reset when cfg changes)
        # CLS attention of the last vision-tower run (VisionZip); kept for calls given precomputed features
        self.cls_scores: torch.Tensor | None = None

    def capture_cls(self, layer: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the vision layer producing the LLM's features: its CLS attention."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            self.cls_scores = self.adapter.cls_attention(layer, hidden)

    def sync_vision_hook(self) -> None:
        """Install the CLS hook while the method is VisionZip; remove it otherwise."""
        wanted = self.cfg.enabled and self.cfg.method == "visionzip"
        if wanted and self.vision_hook is None:
            self.vision_hook = self.adapter.cls_layer().register_forward_pre_hook(self.capture_cls, with_kwargs=True)
        elif not wanted and self.vision_hook is not None:
            self.vision_hook.remove()
            self.vision_hook, self.cls_scores = None, None

    def capture_input_ids(self, _module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the LLaVA wrapper: remember where the image tokens are."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.pending_image_mask = None if input_ids is None else input_ids == self.adapter.image_token_id

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Replacement forward of the language model (the KV cache arrives as ``cache`` or
        ``past_key_values``, whichever the installed transformers uses)."""
        lm = self.adapter.language_model
        image_mask, self.pending_image_mask = self.pending_image_mask, None
        cache = pop_cache(kwargs)

        def dense() -> Any:
            return self.adapter.dense_forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )

        if not self.cfg.enabled:
            return dense()
        state = getattr(cache, CACHE_STATE_ATTR, None) if cache is not None else None
        if inputs_embeds is None:
            inputs_embeds = self.adapter.embed(input_ids)
        if state is not None:
            if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
                attention_mask = None  # a prepared mask mapping; validity is tracked in the cache state
            with _fast_mode():
                return sparse_decode(self.adapter, inputs_embeds, attention_mask, position_ids, cache, state)
        usable = (
            image_mask is not None
            and image_mask.shape == inputs_embeds.shape[:2]
            and bool(image_mask.any())
            and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2))
            and (cache is None or cache.get_seq_length() == 0)
        )
        if not usable:
            return dense()
        if use_cache is None:
            use_cache = bool(getattr(lm.config, "use_cache", True))
        if use_cache and cache is None:
            cache = new_cache(lm.config)
        with _fast_mode():
            output, stats = SparsePrefill(self.cfg, self.adapter, self.cls_scores, self.targets_cache).run(
                inputs_embeds,
                image_mask,
                attention_mask,
                position_ids,
                cache if use_cache else None,
                self.decision_length,
            )
        self.last_stats = stats
        return output


def _fast_mode() -> contextlib.AbstractContextManager:
    """Inference mode when autograd is off anyway: the pruning step is hundreds of small tensor ops, and
    skipping their version counters and view tracking cuts its CPU time by a tenth or more. With gradients
    enabled (training through the sparse model) nothing changes."""
    return contextlib.nullcontext() if torch.is_grad_enabled() else torch.inference_mode()


def _runtime(model: Any) -> SparseRuntime | None:
    return getattr(adapter_for(model).language_model, RUNTIME_ATTR, None)


def enable_sparsevlm(model: Any, cfg: SparseConfig | dict | None = None) -> SparseConfig:
    """Install SparseVLM on ``model`` (config from ``cfg``, else ``model.config.sparsevlm``, else defaults).

    Raises ``UnsupportedModelError`` (a TandemError naming the class) for models without an adapter.
    """
    adapter = adapter_for(model)
    if cfg is None:
        cfg = getattr(model.config, "sparsevlm", None) or {}
    cfg = cfg if isinstance(cfg, SparseConfig) else SparseConfig.model_validate(cfg)
    if cfg.method == "visionzip":
        adapter.cls_layer()  # UnsupportedModelError now rather than at the first forward
    model.config.sparsevlm = cfg.model_dump()
    runtime = _runtime(model)
    if runtime is None:
        runtime = SparseRuntime(cfg, adapter)
        runtime.hook = adapter.wrapper.register_forward_pre_hook(runtime.capture_input_ids, with_kwargs=True)
        setattr(adapter.language_model, RUNTIME_ATTR, runtime)
        adapter.language_model.forward = runtime.forward
    runtime.cfg = cfg
    runtime.targets_cache = {}
    runtime.sync_vision_hook()
    return cfg


def disable_sparsevlm(model: Any) -> None:
    """Remove SparseVLM: the model's own forward runs again; the config records ``enabled: false``."""
    adapter = adapter_for(model)
    runtime = _runtime(model)
    if runtime is not None:
        runtime.hook.remove()
        if runtime.vision_hook is not None:
            runtime.vision_hook.remove()
        del adapter.language_model.forward
        delattr(adapter.language_model, RUNTIME_ATTR)
    stored = getattr(model.config, "sparsevlm", None)
    if stored:
        model.config.sparsevlm = {**stored, "enabled": False}


def apply_from_config(model: Any) -> bool:
    """Install SparseVLM if ``model.config.sparsevlm`` says so (e.g. after ``from_pretrained``);
    returns whether."""
    stored = getattr(model.config, "sparsevlm", None)
    if not stored or not stored.get("enabled", False):
        return False
    enable_sparsevlm(model, stored)
    return True


def expect_image_mask(model: Any, image_mask: torch.Tensor) -> bool:
    """For a call that feeds the language model ``inputs_embeds`` directly (no ``input_ids`` for the pre-hook to
    see): where the visual tokens of the next prefill are, [B, T] bool. Returns False when SparseVLM is off."""
    runtime = _runtime(model)
    if runtime is None:
        return False
    runtime.pending_image_mask = image_mask
    return True


def sparse_stats(model: Any) -> SparseStats | None:
    """Stats of the model's last sparse prefill (None if none ran)."""
    runtime = _runtime(model)
    return runtime.last_stats if runtime is not None else None


@contextlib.contextmanager
def decision_prefix(model: Any, length: int) -> Iterator[None]:
    """Base pruning decisions (raters, scores, FastV's query) on the first ``length`` input columns only.

    A cached ``generate()`` prunes once, on the prompt. A cache-free greedy loop re-runs the prefill on
    prompt + generated tokens; inside this context it prunes exactly as the cached prefill did.
    """
    runtime = _runtime(model)
    if runtime is None:
        raise ValueError("SparseVLM is not enabled on this model")
    previous, runtime.decision_length = runtime.decision_length, int(length)
    try:
        yield
    finally:
        runtime.decision_length = previous
