"""The sparse decoder pass: prefill with progressive visual-token pruning, and cached decode steps after it.

Every decoder layer is the model's own module with SDPA attention; between layers the sequence shrinks (hidden
states, original position ids, mask) and each layer's KV cache holds only the tokens that layer processed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import TandemError
from device.sparse.adapters import DecoderAdapter, model_output, set_logical_length
from device.sparse.config import PRE_LLM_METHODS, SparseConfig
from device.sparse.diversity import weighted_maxmin_order
from device.sparse.prellm import divprune_select, visionzip_split
from device.sparse.raters import NO_TEXT_AFTER_IMAGE, select_raters
from device.sparse.recycle import (
    cluster_dpc_knn,
    cluster_dpc_knn_batch,
    merge_clusters,
    merge_clusters_batch,
    recycle_plan,
    recycled_count,
)
from device.sparse.scoring import attention_rank, random_scores, rater_attention_batch
from device.sparse.sequence import ORIG, POS, VALID, TokenSeq, as_merged, decode_mask, prefill_mask
from device.sparse.stats import PruneStep, SampleStats, SparseStats

CACHE_STATE_ATTR = "_tandem_sparse_state"


@dataclass
class CacheState:
    """What decode steps need to know about a sparse prefill stored in a KV cache."""

    key_valid: list[torch.Tensor]  # per layer [B, n_layer]: which cached prefill slots are real tokens
    orig_len: int  # length of the prefill input (original coordinates)
    next_pos: torch.Tensor  # [B] first position after the prefill
    new_valid: torch.Tensor  # [B, t] validity of the tokens appended since the prefill


def _score_batch(
    cfg: SparseConfig,
    adapter: DecoderAdapter,
    layer: int,
    seq: TokenSeq,
    active: list[int],
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Scores of the current visual slots of the ``active`` samples and their attention matrix P [R, V]."""
    b, n = seq.h.shape[0], seq.length
    dev = seq.h.device
    counts = seq.visual_counts
    if cfg.method == "random":
        seeds = {i: cfg.seed * 1_000_003 + 7919 * layer + i for i in active}
        return {i: (random_scores(counts[i], seeds[i], dev), None) for i in active}
    idx = torch.arange(n, device=dev)
    if cfg.method == "fastv":
        last = torch.where(seq.valid & seq.decide, idx, -1).amax(dim=1)
        rows, n_rows = last[:, None].clamp(min=0), [1] * b
    else:
        n_rows = seq.rater.sum(dim=1).tolist()
        r_max = max(max(n_rows), 1)
        if len(set(n_rows)) == 1 and n_rows[0] > 0:  # every row has as many raters: their slots, in order
            rows = torch.nonzero(seq.rater)[:, 1].view(b, r_max)
        else:
            # rater slots first (in order), then padding that repeats the first rater
            rows = torch.argsort((~seq.rater).long() * n + idx, dim=1)[:, :r_max]
            pad = torch.arange(r_max, device=dev)[None] >= torch.tensor(n_rows, device=dev)[:, None]
            rows = torch.where(pad, rows[:, :1], rows)
    normed = adapter.input_norm(layer, seq.h)
    cos, sin = seq.cos_sin
    attn = rater_attention_batch(adapter, layer, normed, cos, sin, rows, None if seq.all_valid else seq.valid)
    out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    vis_slots = seq.visual_slots
    if vis_slots is not None:
        v = vis_slots.shape[1]
        p_all = attn.gather(2, vis_slots[:, None, :].expand(b, attn.shape[1], v))
        if len(set(n_rows)) == 1:  # no padded rater rows: one mean for the batch
            means = p_all.mean(dim=1)
            return {i: (means[i], p_all[i]) for i in active}
        for i in active:
            p = p_all[i, : n_rows[i]]
            out[i] = (p.mean(dim=0), p)
        return out
    for i in active:
        p = attn[i, : n_rows[i]][:, torch.nonzero(seq.visual[i]).flatten()]
        out[i] = (p.mean(dim=0), p)
    return out


def _target(
    cfg: SparseConfig, step: int, targets: list[int], current: int, p: torch.Tensor | None
) -> tuple[int, int | None]:
    """Visual tokens to keep (merged included) after this step (``targets``: budget mode's counts per step),
    and the rank of P in rank mode."""
    if cfg.mode == "budget":
        return min(targets[step], current), None
    rank = attention_rank(p, cfg.rank_rtol) if p is not None else 0
    delete = round(cfg.rank_lambda * (current - rank))
    return max(1, current - delete), rank


class SparsePrefill:
    """One prefill forward of the language model with visual-token pruning."""

    def __init__(
        self,
        cfg: SparseConfig,
        adapter: DecoderAdapter,
        cls_scores: torch.Tensor | None = None,
        targets_cache: dict[int, list[int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.layers = cfg.drop_layers(adapter.num_layers)  # tokens are dropped before these layers
        # budget counts per visual-token count; the runtime keeps it across calls with one config
        self._targets: dict[int, list[int]] = {} if targets_cache is None else targets_cache
        self.cls_scores = cls_scores  # [B, n_visual] vision-tower CLS attention (method visionzip)

    def _initial(
        self,
        embeds: torch.Tensor,
        image_mask: torch.Tensor,
        valid: torch.Tensor,
        position_ids: torch.Tensor,
        decision_length: int | None,
    ) -> tuple[TokenSeq, list[SampleStats]]:
        """Slots of the input sequence, raters chosen per sample."""
        b, n, _ = embeds.shape
        idx = torch.arange(n, device=embeds.device)
        decide = (idx < (decision_length if decision_length is not None else n))[None].expand(b, n)
        vis = image_mask & valid
        rater = torch.zeros(b, n, dtype=torch.bool, device=embeds.device)
        samples: list[SampleStats] = []
        for i in range(b):
            vis_idx = torch.nonzero(vis[i]).flatten()
            after = int(vis_idx[-1]) + 1 if len(vis_idx) else n
            text_idx = torch.nonzero(valid[i, after:] & decide[i, after:]).flatten() + after
            fallback = NO_TEXT_AFTER_IMAGE if len(text_idx) == 0 else None
            raters = text_idx[:0]
            if self.cfg.method == "sparsevlm":
                raters, fallback = select_raters(
                    embeds[i], vis_idx, text_idx, scaled=self.cfg.rater_scaled, strict=self.cfg.rater_strict
                )
            elif self.cfg.method in ("random", *PRE_LLM_METHODS):
                fallback = None
            rater[i, raters] = True
            samples.append(SampleStats(len(vis_idx), [], raters.tolist(), None, fallback=fallback))
        meta = torch.stack(
            [
                self.adapter.text_positions(position_ids, b, n),
                valid.long(),
                idx[None].expand(b, n),
                vis.long(),
                rater.long(),
                decide.long(),
            ],
            dim=-1,
        )
        cos, sin = self.adapter.rotary(embeds, position_ids)
        d = cos.shape[-1]
        return TokenSeq(embeds, meta, torch.cat([cos.expand(b, n, d), sin.expand(b, n, d)], dim=-1)), samples

    def run(
        self,
        embeds: torch.Tensor,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Any,
        decision_length: int | None,
    ) -> tuple[Any, SparseStats]:
        b, n, _ = embeds.shape
        dev = embeds.device
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(b, n, dtype=torch.bool, device=dev)
        if position_ids is None:
            position_ids = torch.arange(n, device=dev)[None]
        seq, samples = self._initial(embeds, image_mask, valid, position_ids, decision_length)
        # each input column's last hidden state; column n is a sink for slots without one (merged, filler)
        out = embeds.new_zeros(b, n + 1, embeds.shape[-1])
        stash: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # FastV and prune_point 'after' score with the layer before the drop point (whose output is pruned)
        shifted = self.cfg.method == "fastv" or (
            self.cfg.prune_point == "after" and self.cfg.method not in PRE_LLM_METHODS
        )
        score_at = {(p - 1 if shifted and p > 0 else p): p for p in self.layers}
        key_valid: list[torch.Tensor] = []
        mask = prefill_mask(seq)
        counts = seq.visual_counts
        for li in range(self.adapter.num_layers):
            # 'before': score with layer li, then drop before it; shifted: drop (scored by layer li - 1), then
            # score with layer li on the pruned sequence for the drop before layer li + 1
            for action in ("drop", "score") if shifted else ("score", "drop"):
                if action == "score" and li in score_at and self.cfg.method not in PRE_LLM_METHODS:
                    active = [
                        i
                        for i, st in enumerate(samples)
                        if st.fallback != NO_TEXT_AFTER_IMAGE
                        and st.n_visual > 0
                        and (st.visual_scores is None or self._may_prune(score_at[li], st, counts[i]))
                    ]
                    stash = _score_batch(self.cfg, self.adapter, li, seq, active) if active else {}
                elif action == "drop" and li in self.layers:
                    seq = self._prune(seq, li, stash, samples, out)
                    stash = {}
                    mask = prefill_mask(seq)
                    counts = seq.visual_counts
            for i, st in enumerate(samples):
                st.layer_counts.append(int(counts[i]))
            key_valid.append(seq.valid)
            seq.h = self.adapter.run_layer(li, seq.h, mask, seq.cos_sin, seq.pos, cache)
        patch_of = torch.cumsum(image_mask.long(), dim=1) - 1
        visual = seq.visual
        for i, st in enumerate(samples):
            st.final_slots = (seq.pos[i], seq.orig[i], visual[i], patch_of[i])
        _store_states(out, seq.orig, seq.h)
        hidden = self.adapter.final_norm(out[:, :n])
        if cache is not None:
            next_pos = self.adapter.text_positions(position_ids, b, n).max(dim=1).values + 1
            state = CacheState(key_valid, n, next_pos, valid[:, :0])
            setattr(cache, CACHE_STATE_ATTR, state)
            # Layers hold different numbers of tokens; callers asking the cache its length (generate,
            # M-RoPE position bookkeeping) get the logical length: the prompt plus the tokens decoded since.
            set_logical_length(cache, lambda: state.orig_len + state.new_valid.shape[1])
        return model_output(hidden, cache), SparseStats(samples)

    def _may_prune(self, layer: int, st: SampleStats, current: int) -> bool:
        """False when budget mode already holds at most this step's target (scoring can be skipped)."""
        if self.cfg.mode != "budget":
            return True
        return self.targets(st.n_visual)[self.layers.index(layer)] < current

    def targets(self, n_visual: int) -> list[int]:
        """Budget mode: the count after each drop point for a sample of ``n_visual`` tokens (cached)."""
        if n_visual not in self._targets:
            self._targets[n_visual] = self.cfg.step_targets(n_visual, len(self.layers), self.adapter.num_layers)
        return self._targets[n_visual]

    def _prune(
        self,
        seq: TokenSeq,
        layer: int,
        stash: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
        samples: list[SampleStats],
        out: torch.Tensor,
    ) -> TokenSeq:
        """Drop (and recycle) visual slots of every sample before ``layer``; write dropped states to
        ``out``."""
        step = self.layers.index(layer)
        if self.cfg.method in PRE_LLM_METHODS:
            return self._renumber(self._select_pre_llm(seq, layer, samples, out))
        batched = self._prune_batched(seq, layer, step, stash, samples, out)
        if batched is not None:
            return self._renumber(batched)
        rows: list[tuple] = []
        everything = torch.arange(seq.length, device=seq.h.device)
        for i, st in enumerate(samples):
            if i not in stash:
                rows.append(seq.row(i, everything, seq.h[i, :0], everything[:0]))
                continue
            scores, p = stash[i]
            if st.visual_scores is None:
                st.visual_scores = scores.detach().clone()
            vis_slots = torch.nonzero(seq.visual[i]).flatten()
            current = len(vis_slots)
            target, rank = _target(self.cfg, step, self.targets(st.n_visual), current, p)
            if target >= current:
                st.steps.append(PruneStep(layer, current, current, 0, rank))
                rows.append(seq.row(i, everything, seq.h[i, :0], everything[:0]))
                continue
            cfg = self.cfg
            groups = self._groups(target, current)
            order = self._rank(scores[None], lambda i=i, slots=vis_slots: seq.h[i, slots][None], target, current)[0]
            kept = vis_slots[order[: target - groups]]
            pruned = vis_slots[order[target - groups :]]
            merged_h, merged_slot = seq.h[i, :0], everything[:0]
            merged_key = None
            if groups:
                n_rec = max(groups, recycled_count(len(pruned), cfg.recycle_ratio))
                recycled = pruned[:n_rec]
                states = seq.h[i, recycled]
                labels = cluster_dpc_knn(states, groups, *self._density(groups))
                merged_h = merge_clusters(states, labels, groups)
                # representative: the best-scored member (recycled is sorted by score, best first)
                first = torch.full((groups,), n_rec, dtype=torch.long, device=labels.device)
                first = first.scatter_reduce(0, labels, torch.arange(n_rec, device=labels.device), "amin")
                merged_slot = recycled[first]
                merged_key = self._merged_keys(vis_slots[None], merged_slot[None])
                merged_key = None if merged_key is None else merged_key[0]
            orig = seq.orig[i, pruned]
            dropped = orig >= 0
            out[i, orig[dropped]] = seq.h[i, pruned[dropped]]
            keep_mask = ~seq.visual[i]
            keep_mask[kept] = True
            rows.append(seq.row(i, torch.nonzero(keep_mask).flatten(), merged_h, merged_slot, merged_key))
            st.steps.append(PruneStep(layer, current, target, groups, rank))
        return self._renumber(TokenSeq.stack(rows))

    def _density(self, groups: int) -> tuple[int, bool]:
        """(k, include_self) of the recycling clustering's density (``cluster_density``)."""
        if self.cfg.cluster_density == "cluster_num_including_self":
            return groups, True
        return self.cfg.cluster_knn, False

    def _merged_keys(self, vis_slots: torch.Tensor, merged_slot: torch.Tensor) -> torch.Tensor | None:
        """Sort keys [B, g] placing merged tokens after the kept visual block (``after_kept``), else None."""
        if self.cfg.merged_placement != "after_kept":
            return None
        last = vis_slots.amax(dim=1, keepdim=True).double()
        step = torch.arange(1, merged_slot.shape[1] + 1, device=merged_slot.device, dtype=torch.float64)
        return last + step[None] / (merged_slot.shape[1] + 1)

    def _renumber(self, seq: TokenSeq) -> TokenSeq:
        """``positions='renumber'``: positions 0..n-1 over each row's valid slots, RoPE recomputed."""
        if self.cfg.positions != "renumber":
            return seq
        valid = seq.meta[..., VALID]
        pos = (valid.cumsum(dim=1) - 1).clamp(min=0)
        meta = seq.meta.clone()
        meta[..., POS] = pos
        cos, sin = self.adapter.rotary_plain(seq.h, pos)
        return TokenSeq(seq.h, meta, torch.cat([cos, sin], dim=-1).to(seq.rope.dtype))

    def _select_pre_llm(self, seq: TokenSeq, layer: int, samples: list[SampleStats], out: torch.Tensor) -> TokenSeq:
        """VisionZip- or DivPrune-style selection of each sample's visual tokens before the first layer."""
        cfg = self.cfg
        everything = torch.arange(seq.length, device=seq.h.device)
        rows: list[tuple] = []
        for i, st in enumerate(samples):
            vis_slots = torch.nonzero(seq.visual[i]).flatten()
            current = len(vis_slots)
            target = min(self.targets(st.n_visual)[0], current)
            if current == 0 or target >= current:
                st.steps.append(PruneStep(layer, current, current, 0, None))
                rows.append(seq.row(i, everything, seq.h[i, :0], everything[:0]))
                continue
            x = seq.h[i, vis_slots]
            merged_h, merged_slot = seq.h[i, :0], everything[:0]
            if cfg.method == "divprune":
                kept = vis_slots[divprune_select(x[None], target)[0]]
                n_merged = 0
            else:
                if self.cls_scores is None or self.cls_scores.shape[0] != len(samples):
                    raise TandemError(
                        "method 'visionzip' needs the vision tower's CLS attention of this batch: run the model "
                        "with pixel_values (or compute the image features with VisionZip enabled)"
                    )
                scores = self.cls_scores[i, : st.n_visual].to(x.device)
                st.visual_scores = scores.detach().clone()
                dominant, targets, merged = visionzip_split(x, scores, target)
                kept = vis_slots[dominant]
                merged_h, merged_slot = merged, vis_slots[targets]
                n_merged = len(targets)
            keep_mask = ~seq.visual[i]
            keep_mask[kept] = True
            dropped = seq.visual[i] & ~keep_mask
            orig = seq.orig[i, dropped]
            out[i, orig[orig >= 0]] = seq.h[i, dropped][orig >= 0]
            rows.append(seq.row(i, torch.nonzero(keep_mask).flatten(), merged_h, merged_slot))
            st.steps.append(PruneStep(layer, current, target, n_merged, None))
        return TokenSeq.stack(rows)

    def _prune_batched(
        self,
        seq: TokenSeq,
        layer: int,
        step: int,
        stash: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
        samples: list[SampleStats],
        out: torch.Tensor,
    ) -> TokenSeq | None:
        """Budget mode with every row alike (same visual count, all scored): one set of batched ops.

        Returns ``None`` when the rows differ; the per-sample path handles that.
        """
        cfg = self.cfg
        b = len(samples)
        n0 = samples[0].n_visual
        if cfg.mode != "budget" or len(stash) != b or any(st.n_visual != n0 for st in samples):
            return None
        vis_slots = seq.visual_slots
        if vis_slots is None:
            return None
        v = vis_slots.shape[1]
        scores = stash[0][0][None] if b == 1 else torch.stack([stash[i][0] for i in range(b)])
        for i, st in enumerate(samples):
            if st.visual_scores is None:
                st.visual_scores = scores[i]
        target, _ = _target(cfg, step, self.targets(n0), v, None)
        if target >= v:
            for st in samples:
                st.steps.append(PruneStep(layer, v, v, 0, None))
            return seq
        groups = self._groups(target, v)
        n_keep = target - groups
        ranked = vis_slots.gather(1, self._rank(scores, lambda: _gather_rows(seq.h, vis_slots), target, v))
        pruned = ranked[:, n_keep:]
        _store_states(out, seq.orig.gather(1, pruned), _gather_rows(seq.h, pruned))
        keep_mask = ~seq.visual
        keep_mask.scatter_(1, ranked[:, :n_keep], True)
        merged_h = merged_slot = None
        if groups:
            n_rec = max(groups, recycled_count(v - n_keep, cfg.recycle_ratio))
            recycled = pruned[:, :n_rec]
            states = _gather_rows(seq.h, recycled)
            labels = cluster_dpc_knn_batch(states, groups, *self._density(groups))
            merged_h = merge_clusters_batch(states, labels, groups).to(seq.h.dtype)
            # representative: the best-scored member (recycled is sorted by score, best first)
            ranks = torch.arange(n_rec, device=labels.device).expand(b, n_rec)
            first = torch.full((b, groups), n_rec, dtype=torch.long, device=labels.device)
            merged_slot = recycled.gather(1, first.scatter_reduce(1, labels, ranks, "amin"))
            keys = self._merged_keys(vis_slots, merged_slot)
            if keys is not None:
                return self._with_merged_after_kept(
                    seq, keep_mask, merged_h, merged_slot, keys, samples, layer, v, target, groups
                )
            keep_mask.scatter_(1, merged_slot, True)  # a merged token takes its representative's (pruned) slot
        keep_idx = torch.nonzero(keep_mask)[:, 1].view(b, -1)
        h_new, meta_new = _gather_rows(seq.h, keep_idx), _gather_rows(seq.meta, keep_idx)
        rope_new = _gather_rows(seq.rope, keep_idx)
        if merged_slot is not None and merged_h is not None:
            at = (keep_mask.cumsum(dim=1) - 1).gather(1, merged_slot)  # the merged tokens' new slots
            h_new.scatter_(1, at[..., None].expand(*at.shape, h_new.shape[-1]), merged_h)
            # the representative's meta is already a valid visual non-rater slot; only its input index goes
            meta_new[..., ORIG].scatter_(1, at, -1)
        for st in samples:
            st.steps.append(PruneStep(layer, v, target, groups, None))
        return TokenSeq(h_new, meta_new, rope_new)

    def _with_merged_after_kept(
        self,
        seq: TokenSeq,
        keep_mask: torch.Tensor,
        merged_h: torch.Tensor,
        merged_slot: torch.Tensor,
        keys: torch.Tensor,
        samples: list[SampleStats],
        layer: int,
        v: int,
        target: int,
        groups: int,
    ) -> TokenSeq:
        """``merged_placement='after_kept'``: the kept slots, then the merged tokens after the kept visual block
        (sort keys ``keys``), each with its representative's meta and RoPE."""
        b = keep_mask.shape[0]
        keep_idx = torch.nonzero(keep_mask)[:, 1].view(b, -1)
        merged_meta = as_merged(_gather_rows(seq.meta, merged_slot))
        order = torch.argsort(torch.cat([keep_idx.double(), keys], dim=1), dim=1)
        h_new = _gather_rows(torch.cat([_gather_rows(seq.h, keep_idx), merged_h], dim=1), order)
        meta_new = _gather_rows(torch.cat([_gather_rows(seq.meta, keep_idx), merged_meta], dim=1), order)
        rope_new = _gather_rows(
            torch.cat([_gather_rows(seq.rope, keep_idx), _gather_rows(seq.rope, merged_slot)], dim=1), order
        )
        for st in samples:
            st.steps.append(PruneStep(layer, v, target, groups, None))
        return TokenSeq(h_new, meta_new, rope_new)

    def _rank(
        self, scores: torch.Tensor, states: Callable[[], torch.Tensor], target: int, current: int
    ) -> torch.Tensor:
        """Order [B, v] of the visual tokens, best first: by score, or (``relevance_weight``, method sparsevlm)
        the kept ones chosen by relevance-weighted max-min diversity over ``states()`` [B, v, d], then the rest
        by score."""
        weight = self.cfg.relevance_weight
        if weight is None or self.cfg.method != "sparsevlm":
            return torch.argsort(scores, dim=1, descending=True, stable=True)
        return weighted_maxmin_order(scores, states(), weight, target - self._groups(target, current))

    def _groups(self, target: int, current: int) -> int:
        """Merged tokens when pruning ``current`` visual tokens to ``target``."""
        cfg = self.cfg
        return recycle_plan(target, current, cfg.recycle, cfg.recycle_ratio, cfg.cluster_ratio)


def _store_states(out: torch.Tensor, orig: torch.Tensor, h: torch.Tensor) -> None:
    """Write hidden states ``h`` [B, m, d] to their input columns ``orig`` [B, m] of ``out`` [B, n + 1, d]
    (index -1, a merged token or filler, goes to the sink column n)."""
    sink = out.shape[1] - 1
    idx = torch.where(orig >= 0, orig, sink)
    out.scatter_(1, idx[..., None].expand(*idx.shape, out.shape[-1]), h)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` [B, n, c] at ``idx`` [B, m] -> [B, m, c]."""
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def sparse_decode(
    adapter: DecoderAdapter,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Any,
    state: CacheState,
) -> Any:
    """Decode step(s) on top of a sparse prefill: per-layer masks over each layer's own cached slots."""
    b, q, _ = embeds.shape
    t_past = state.new_valid.shape[1]
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= q:
        fresh = attention_mask[:, -q:].bool()
    else:
        fresh = torch.ones(b, q, dtype=torch.bool, device=embeds.device)
    new_valid = torch.cat([state.new_valid, fresh], dim=1)
    if position_ids is None:
        position_ids = state.next_pos[:, None] + t_past + torch.arange(q, device=embeds.device)[None]
    cos, sin = adapter.rotary(embeds, position_ids)
    position_ids = adapter.text_positions(position_ids, b, q)
    h = embeds
    all_new_valid = bool(new_valid.all())
    for li in range(adapter.num_layers):
        prefix_valid = state.key_valid[li]
        plain = q == 1 and all_new_valid and bool(prefix_valid.all())
        mask = None if plain else decode_mask(prefix_valid, new_valid, q)
        h = adapter.run_layer(li, h, mask, (cos, sin), position_ids, cache)
    state.new_valid = new_valid
    return model_output(adapter.final_norm(h), cache)
