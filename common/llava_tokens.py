"""Answer passes over a *subset* of visual tokens, for every supported MLLM family (``common.mllm_family``).

Device and cloud share the frozen vision tower, so what travels is its features for selected visual tokens; both
sides then run projector + language model on only those tokens. This module builds those inputs (the family
says how to project them and where each token sits: 1D positions for LLaVA, M-RoPE for Qwen2-VL) and returns the
answer-position logits and hidden states. It works on a plain ``*ForConditionalGeneration`` or on a ``PeftModel``
wrapping one (LoRA layers are applied in place). Greedy answers reuse the language model's KV cache: an N-token
answer is one prefill plus N - 1 one-token steps (a SparseVLM prefill leaves its pruned cache, which the steps
read).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.adapters import RowAdapters
from common.errors import TandemError
from common.mllm_family import LLAVA_TEMPLATE, family_of, grids_or_none, unwrap

DEFAULT_PROMPT_TEMPLATE = LLAVA_TEMPLATE


class TokenPathError(TandemError):
    """Inputs to the selected-token forward are inconsistent (shapes, empty batch, missing image slot)."""


@dataclass
class AnswerOutput:
    """Answer-position outputs for a batch: logits [B, V] and last-layer hidden states [B, H].

    With ``with_relevance``: ``similarity[i]`` [k_i] is the cosine between each image token's last-layer
    state and the answer position's state; ``attention[i]`` [k_i] is the answer position's attention to
    each image token averaged over layers and heads (None unless the model runs eager attention).

    With a ``continuation`` (answer tokens fed after the prompt, teacher forcing): ``step_logits`` [B, T+1, V] and
    ``step_hidden`` [B, T+1, H] at the last prompt position and each continuation position (row ``i``'s entries
    past its own ``len(continuation[i])`` repeat its last one); ``logits``/``hidden`` are those of the last fed token.

    With ``use_cache``: ``cache`` is the language model's KV cache after the pass, ``mask`` [B, T] the attention
    mask it was built with (right padding) and ``next_positions`` [B] each row's position after its last token.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    similarity: list[torch.Tensor] | None = None
    attention: list[torch.Tensor] | None = None
    step_logits: torch.Tensor | None = None
    step_hidden: torch.Tensor | None = None
    cache: Any = None
    mask: torch.Tensor | None = None
    next_positions: torch.Tensor | None = None


def unwrap_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForConditionalGeneration`` inside a PeftModel (or the model itself); every family's."""
    return unwrap(model)


def vision_features(model: torch.nn.Module, pixel_values: Any) -> Any:
    """What the model's projector takes, per image (``common.mllm_family``): LLaVA [B, N, D] tower features at
    the feature layer, CLS dropped; Qwen2-VL (``pixel_values`` = (flattened patches, image_grid_thw)) a list of
    [n_i, 4 * embed_dim] pre-merger features per visual token."""
    return family_of(model).vision_features(model, pixel_values)


class PromptBuilder:
    """Token ids of the chat prompt with a variable number of image tokens at the image slot."""

    def __init__(self, tokenizer, image_token_id: int, template: str = DEFAULT_PROMPT_TEMPLATE) -> None:
        if "{question}" not in template:
            raise TokenPathError("prompt template must contain '{question}' (and the family's image placeholder)")
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.template = template
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer, template: str | None = None) -> PromptBuilder:
        """The prompt builder of ``model``'s family: its image token and (unless given) its chat template."""
        base = unwrap(model)
        return cls(tokenizer, int(base.config.image_token_id), template or family_of(model).template)

    def split(self, question: str) -> tuple[list[int], list[int]]:
        """Ids before and after the single image slot of ``question``'s prompt."""
        hit = self._cache.get(question)
        if hit is not None:
            return hit
        ids = self.tokenizer(self.template.format(question=question), add_special_tokens=True)["input_ids"]
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != 1:
            raise TokenPathError(f"prompt must hold exactly one image token, found {len(slots)}")
        pair = (list(ids[: slots[0]]), list(ids[slots[0] + 1 :]))
        self._cache[question] = pair
        return pair


def upload_positions(samples: Sequence[Any]) -> dict[str, list]:
    """``answer_forward``'s ``kept`` and ``grids`` for uploaded samples (``common.sample_codec.UploadSample``): each
    token's index in its image's grid, and the grid (None: square of ``num_patches``)."""
    return {"kept": [s.patch_indices for s in samples], "grids": [_grid(s) for s in samples]}


def _grid(sample: Any) -> tuple[int, int] | None:
    if sample.grid is not None:
        return tuple(sample.grid)
    side = int(round(sample.num_patches**0.5))
    return (side, side) if side * side == sample.num_patches else None


def _cache_kwargs(lm: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV cache as the language model's own forward names it (``cache`` from transformers 5.24 on)."""
    params = inspect.signature(type(lm).forward).parameters
    return {("cache" if "cache" in params else "past_key_values"): cache}


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def answer_forward(
    model: torch.nn.Module,
    prompts: PromptBuilder,
    features: Sequence[torch.Tensor],
    questions: Sequence[str],
    with_relevance: bool = False,
    before_lm: Callable[[torch.Tensor], None] | None = None,
    continuation: Sequence[Sequence[int]] | None = None,
    *,
    grids: Sequence[tuple[int, int] | None] | None = None,
    kept: Sequence[torch.Tensor | None] | None = None,
    use_cache: bool = False,
    adapters: RowAdapters | None = None,
) -> AnswerOutput:
    """Run projector + language model on each sample's selected features and question.

    ``features[i]`` is [k_i, D] (k_i may differ; right padding). Returns logits and last hidden state at the
    last prompt position, i.e. the distribution of the first answer token. ``before_lm``, if given, is called
    with the [B, T] boolean mask of the image positions right before the language model runs (a token-pruning
    language model such as SparseVLM's needs to know where the visual tokens are). ``continuation[i]``: answer
    token ids appended after sample ``i``'s prompt (generation's next step, or the teacher's answer to force).
    ``kept[i]``: the indices of ``features[i]``'s tokens in the image's full token grid ``grids[i]`` (rows,
    columns); families with 2D positions (Qwen2-VL) place each token there (None: all tokens, a square grid).
    ``adapters``: per-row LoRA adapters (entered by the caller around this call); the projector of sample ``i``
    runs with sample ``i``'s.
    """
    if len(features) == 0:
        raise TokenPathError("empty batch")
    if len(features) != len(questions):
        raise TokenPathError(f"{len(features)} feature sets for {len(questions)} questions")
    if continuation is not None and len(continuation) != len(questions):
        raise TokenPathError(f"{len(continuation)} continuations for {len(questions)} questions")
    family = family_of(model)
    base = unwrap(model)
    embed = base.get_input_embeddings()
    in_dim = family.feature_dim(model)
    dev = next(family.projector(model).parameters()).device
    grid_list = grids_or_none(grids, len(features))
    kept_list = list(kept) if kept is not None else [None] * len(features)
    seqs: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    positions: list[torch.Tensor] = []
    fed: list[int] = []
    for i, (feats, question) in enumerate(zip(features, questions, strict=True)):
        if feats.dim() != 2 or feats.shape[1] != in_dim or feats.shape[0] == 0:
            raise TokenPathError(f"features must be [k>0, {in_dim}], got {tuple(feats.shape)}")
        before, after = prompts.split(question)
        extra = [int(t) for t in continuation[i]] if continuation is not None else []
        fed.append(len(extra))
        after = after + extra
        ids_b = torch.tensor(before, dtype=torch.long, device=dev)
        ids_a = torch.tensor(after, dtype=torch.long, device=dev)
        if adapters is not None:
            adapters.select(i)
        vis = family.project(model, feats)
        seqs.append(torch.cat([embed(ids_b), vis, embed(ids_a)], dim=0))
        spans.append((len(before), len(before) + vis.shape[0]))
        positions.append(family.positions(len(before), grid_list[i], kept_list[i], vis.shape[0], len(after)))
    lengths = torch.tensor([s.shape[0] for s in seqs], device=dev)
    width = int(lengths.max())
    hidden_size = seqs[0].shape[1]
    batch = seqs[0].new_zeros((len(seqs), width, hidden_size))
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=dev)
    pos = torch.zeros((family.position_dims, len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
        pos[:, i, : s.shape[0]] = positions[i]
    pos = pos.to(dev)
    position_ids = pos[0] if family.position_dims == 1 else pos
    lm = base.model.language_model
    eager = getattr(base.config.text_config, "_attn_implementation", None) == "eager"
    if before_lm is not None:
        columns = torch.arange(width, device=dev)[None]
        starts = torch.tensor([a for a, _ in spans], device=dev)[:, None]
        ends = torch.tensor([b for _, b in spans], device=dev)[:, None]
        before_lm((columns >= starts) & (columns < ends))
    extra_kwargs = _cache_kwargs(lm, None) if use_cache else {}
    out = lm(
        inputs_embeds=batch,
        attention_mask=mask,
        position_ids=position_ids,
        output_attentions=with_relevance and eager,
        use_cache=use_cache,
        return_dict=True,
        **extra_kwargs,
    )
    rows = torch.arange(len(seqs), device=dev)
    last = out.last_hidden_state[rows, lengths - 1]
    logits = base.lm_head(last)
    result = AnswerOutput(logits=logits, hidden=last)
    if use_cache:
        result.cache, result.mask = _output_cache(out), mask
        result.next_positions = pos.amax(dim=0)[rows, lengths - 1] + 1
    if continuation is not None:
        steps = max(fed) + 1
        offsets = torch.arange(steps, device=dev)[None]
        fed_t = torch.tensor(fed, device=dev)[:, None]
        cols = (lengths[:, None] - 1 - fed_t + torch.minimum(offsets, fed_t)).clamp(min=0)
        result.step_hidden = out.last_hidden_state[rows[:, None], cols]
        result.step_logits = base.lm_head(result.step_hidden)
    if with_relevance:
        result.similarity = [
            torch.nn.functional.cosine_similarity(out.last_hidden_state[i, a:b], last[i : i + 1], dim=-1)
            for i, (a, b) in enumerate(spans)
        ]
        if eager and out.attentions:
            stacked = torch.stack([att.mean(dim=1) for att in out.attentions]).mean(dim=0)  # [B, T, T]
            result.attention = [stacked[i, int(lengths[i]) - 1, a:b] for i, (a, b) in enumerate(spans)]
    return result


def decode_step(model: torch.nn.Module, state: AnswerOutput, tokens: torch.Tensor, step: int) -> torch.Tensor:
    """One cached step: feed ``tokens`` [B] after everything ``state`` (a ``use_cache`` pass) and the ``step``
    tokens fed since then hold; returns the next logits [B, V]. Updates ``state.cache`` in place."""
    family = family_of(model)
    base = unwrap(model)
    lm = base.model.language_model
    dev = state.logits.device
    b = tokens.shape[0]
    emb = base.get_input_embeddings()(tokens.to(dev)[:, None])
    mask = torch.cat([state.mask, torch.ones(b, step + 1, dtype=state.mask.dtype, device=dev)], dim=1)
    pos = (state.next_positions + step)[:, None]  # type: ignore[operator]
    position_ids = pos if family.position_dims == 1 else pos[None].expand(family.position_dims, b, 1)
    out = lm(
        inputs_embeds=emb,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        return_dict=True,
        **_cache_kwargs(lm, state.cache),
    )
    state.cache = _output_cache(out)
    return base.lm_head(out.last_hidden_state[:, -1])


def greedy_continuations(
    model: torch.nn.Module,
    prompts: PromptBuilder,
    features: Sequence[torch.Tensor],
    questions: Sequence[str],
    first: torch.Tensor | AnswerOutput,
    limits: Sequence[int],
    eos_id: int | None,
    before_lm: Callable[[torch.Tensor], None] | None = None,
    *,
    grids: Sequence[tuple[int, int] | None] | None = None,
    kept: Sequence[torch.Tensor | None] | None = None,
    adapters: RowAdapters | None = None,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Greedy answers after a first step: each row grows by its argmax until ``limits[i]`` tokens or ``eos_id``.

    ``first`` is that step's ``AnswerOutput`` from a ``use_cache`` pass (then every further token is one cached
    step, ``decode_step``) or its logits [B, V] (then every further step re-runs the prefill on the prompt and the
    tokens so far, ``continuation``: the reference the cached path is tested against).

    Returns the sequences (a final ``eos_id`` included), the logits that chose each token [B, T, V] and the mask
    [B, T] of each row's answer tokens (without the end-of-sequence one, unless that is all it has).
    """
    state = first if isinstance(first, AnswerOutput) and first.cache is not None else None
    first_logits = first.logits if isinstance(first, AnswerOutput) else first
    seqs = [[int(t)] for t in first_logits.argmax(-1).tolist()]
    steps = [first_logits.float()]
    done = [lim <= 1 or s[-1] == eos_id for s, lim in zip(seqs, limits, strict=True)]
    while not all(done):
        if state is not None:
            last = torch.tensor([s[-1] for s in seqs], dtype=torch.long)
            logits = decode_step(model, state, last, len(steps) - 1)
        else:
            logits = answer_forward(
                model, prompts, features, questions, before_lm=before_lm, continuation=seqs, grids=grids, kept=kept,
                adapters=adapters,
            ).logits  # fmt: skip
        steps.append(logits.float())
        for i, token in enumerate(logits.argmax(-1).tolist()):
            if not done[i]:
                seqs[i].append(int(token))
                done[i] = len(seqs[i]) >= limits[i] or token == eos_id
    logits = torch.stack(steps, dim=1)
    mask = torch.zeros(logits.shape[:2], dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, : max(1, len(s) - (s[-1] == eos_id))] = True
    return seqs, logits, mask
