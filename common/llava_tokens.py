"""LLaVA forward passes over a *subset* of visual tokens.

LLaVA feeds the projector with the vision tower's hidden states at ``vision_feature_layer`` (CLS dropped
with the "default" strategy). Device and cloud share that frozen tower, so what travels is those features
for selected patches; both sides then run projector + language model on only the selected tokens. This
module builds those inputs and returns the answer-position logits and hidden states. It works on a plain
``LlavaForConditionalGeneration`` or on a ``PeftModel`` wrapping one (LoRA layers are applied in place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common.adapters import RowAdapters
from common.errors import TandemError

DEFAULT_PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


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
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    similarity: list[torch.Tensor] | None = None
    attention: list[torch.Tensor] | None = None
    step_logits: torch.Tensor | None = None
    step_hidden: torch.Tensor | None = None


def unwrap_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaForConditionalGeneration`` inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def vision_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector: tower hidden states at the feature layer, CLS dropped. [B, N, D]."""
    llava = unwrap_llava(model)
    cfg = llava.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise TokenPathError("only a single integer vision_feature_layer is supported")
    out = llava.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[layer]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats


class PromptBuilder:
    """Token ids of the chat prompt with a variable number of image tokens at the image slot."""

    def __init__(self, tokenizer, image_token_id: int, template: str = DEFAULT_PROMPT_TEMPLATE) -> None:
        if "{question}" not in template or "<image>" not in template:
            raise TokenPathError("prompt template must contain '<image>' and '{question}'")
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.template = template
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

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


def answer_forward(
    model: torch.nn.Module,
    prompts: PromptBuilder,
    features: Sequence[torch.Tensor],
    questions: Sequence[str],
    with_relevance: bool = False,
    before_lm: Callable[[torch.Tensor], None] | None = None,
    continuation: Sequence[Sequence[int]] | None = None,
    adapters: RowAdapters | None = None,
) -> AnswerOutput:
    """Run projector + language model on each sample's selected features and question.

    ``features[i]`` is [k_i, D] (k_i may differ; right padding). Returns logits and last hidden state at the
    last prompt position, i.e. the distribution of the first answer token. ``before_lm``, if given, is called
    with the [B, T] boolean mask of the image positions right before the language model runs (a token-pruning
    language model such as SparseVLM's needs to know where the visual tokens are). ``continuation[i]``: answer
    token ids appended after sample ``i``'s prompt (generation's next step, or the teacher's answer to force).
    ``adapters``: per-row LoRA adapters (entered by the caller around this call); the projector of sample ``i``
    runs with sample ``i``'s.
    """
    if len(features) == 0:
        raise TokenPathError("empty batch")
    if len(features) != len(questions):
        raise TokenPathError(f"{len(features)} feature sets for {len(questions)} questions")
    if continuation is not None and len(continuation) != len(questions):
        raise TokenPathError(f"{len(continuation)} continuations for {len(questions)} questions")
    llava = unwrap_llava(model)
    embed = llava.get_input_embeddings()
    projector = llava.model.multi_modal_projector
    in_dim = projector.linear_1.in_features
    param = next(projector.parameters())
    seqs: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    fed: list[int] = []
    for i, (feats, question) in enumerate(zip(features, questions, strict=True)):
        if feats.dim() != 2 or feats.shape[1] != in_dim or feats.shape[0] == 0:
            raise TokenPathError(f"features must be [k>0, {in_dim}], got {tuple(feats.shape)}")
        before, after = prompts.split(question)
        extra = [int(t) for t in continuation[i]] if continuation is not None else []
        fed.append(len(extra))
        after = after + extra
        ids_b = torch.tensor(before, dtype=torch.long, device=param.device)
        ids_a = torch.tensor(after, dtype=torch.long, device=param.device)
        if adapters is not None:
            adapters.select(i)
        vis = projector(feats.to(param.device, param.dtype))
        seqs.append(torch.cat([embed(ids_b), vis, embed(ids_a)], dim=0))
        spans.append((len(before), len(before) + vis.shape[0]))
    lengths = torch.tensor([s.shape[0] for s in seqs], device=param.device)
    width = int(lengths.max())
    hidden_size = seqs[0].shape[1]
    batch = seqs[0].new_zeros((len(seqs), width, hidden_size))
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=param.device)
    for i, s in enumerate(seqs):
        batch[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    eager = getattr(llava.config.text_config, "_attn_implementation", None) == "eager"
    if before_lm is not None:
        columns = torch.arange(width, device=param.device)[None]
        starts = torch.tensor([a for a, _ in spans], device=param.device)[:, None]
        ends = torch.tensor([b for _, b in spans], device=param.device)[:, None]
        before_lm((columns >= starts) & (columns < ends))
    out = llava.model.language_model(
        inputs_embeds=batch, attention_mask=mask, output_attentions=with_relevance and eager, return_dict=True
    )
    last = out.last_hidden_state[torch.arange(len(seqs), device=param.device), lengths - 1]
    logits = llava.lm_head(last)
    result = AnswerOutput(logits=logits, hidden=last)
    if continuation is not None:
        steps = max(fed) + 1
        offsets = torch.arange(steps, device=param.device)[None]
        fed_t = torch.tensor(fed, device=param.device)[:, None]
        cols = (lengths[:, None] - 1 - fed_t + torch.minimum(offsets, fed_t)).clamp(min=0)
        rows = torch.arange(len(seqs), device=param.device)[:, None]
        result.step_hidden = out.last_hidden_state[rows, cols]
        result.step_logits = llava.lm_head(result.step_hidden)
    if with_relevance:
        result.similarity = [
            torch.nn.functional.cosine_similarity(out.last_hidden_state[i, a:b], last[i : i + 1], dim=-1)
            for i, (a, b) in enumerate(spans)
        ]
        if eager and out.attentions:
            stacked = torch.stack([att.mean(dim=1) for att in out.attentions]).mean(dim=0)  # [B, T, T]
            result.attention = [stacked[i, int(lengths[i]) - 1, a:b] for i, (a, b) in enumerate(spans)]
    return result


def greedy_continuations(
    model: torch.nn.Module,
    prompts: PromptBuilder,
    features: Sequence[torch.Tensor],
    questions: Sequence[str],
    first_logits: torch.Tensor,
    limits: Sequence[int],
    eos_id: int | None,
    before_lm: Callable[[torch.Tensor], None] | None = None,
    adapters: RowAdapters | None = None,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Greedy answers after a first step whose logits [B, V] are ``first_logits``: each row grows by its argmax
    until ``limits[i]`` tokens or ``eos_id``. Every further step feeds the tokens so far (``continuation``).

    Returns the sequences (a final ``eos_id`` included), the logits that chose each token [B, T, V] and the mask
    [B, T] of each row's answer tokens (without the end-of-sequence one, unless that is all it has).
    """
    seqs = [[int(t)] for t in first_logits.argmax(-1).tolist()]
    steps = [first_logits.float()]
    done = [lim <= 1 or s[-1] == eos_id for s, lim in zip(seqs, limits, strict=True)]
    while not all(done):
        out = answer_forward(
            model, prompts, features, questions, before_lm=before_lm, continuation=seqs, adapters=adapters
        )
        steps.append(out.logits.float())
        for i, token in enumerate(out.logits.argmax(-1).tolist()):
            if not done[i]:
                seqs[i].append(int(token))
                done[i] = len(seqs[i]) >= limits[i] or token == eos_id
    logits = torch.stack(steps, dim=1)
    mask = torch.zeros(logits.shape[:2], dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, : max(1, len(s) - (s[-1] == eos_id))] = True
    return seqs, logits, mask
