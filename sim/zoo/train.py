"""Zoo training stages: dense vision pretraining, then answer training of teacher and device.

Stage 1 pretrains the shared CLIP vision tower on dense per-patch scene targets (``patch_targets``) of clear and
mildly shifted images, as CLIP was pretrained on its own data. Stage 2 trains a LLaVA model's projector and
language model with the vision tower frozen: the teacher on every domain, the device model on the clear domain
only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionModel, LlavaForConditionalGeneration

from sim.world import World
from sim.world.shifts import Domain, ShiftSpec
from sim.zoo.batching import BatchEncoder
from sim.zoo.compiling import compiled
from sim.zoo.patch_targets import TARGETS, DensePatchHeads, batch_targets
from sim.zoo.recipe import StageSpec
from sim.zoo.tower_cut import tower_up_to_feature_layer

ProgressFn = Callable[[int, float], None]
# Severity from which a shift named in ``colour_rolls`` renames colours.
ROLL_FROM = 0.5
# Shifts the teacher trains on (every benchmark shift plus plain blur).
TEACHER_SHIFTS = ("dusk", "night", "cast", "fog", "blur", "noise", "palette", "background")


def lr_at(step: int, spec: StageSpec) -> float:
    """Linear warm-up then cosine decay to 10% of the peak rate."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> float:
    """One clipped AdamW step at learning rate ``lr``; returns the loss value."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def pretrain_vision(
    tower: CLIPVisionModel,
    world: World,
    encoder: BatchEncoder,
    spec: StageSpec,
    on_step: ProgressFn | None = None,
    max_severity: Mapping[str, float] | None = None,
    private_heads: Mapping[str, float] | None = None,
    confusion_weight: float = 0.0,
    colour_rolls: Mapping[str, int] | None = None,
    shift_weights: Mapping[str, float] | None = None,
) -> tuple[list[float], DensePatchHeads, dict[str, DensePatchHeads]]:
    """Train the vision tower on dense per-patch targets; returns the loss per step, the shared heads and the
    private heads.

    Half of the images are clear, the others carry random shifts, each up to its ``max_severity`` (shift name ->
    severity; shifts not named, or an empty mapping, are never seen). Shifts kept mild here stay out of the
    tower's distribution at benchmark strength (severity 1), as a real camera's night mode would for CLIP.
    ``private_heads`` (shift name -> severity) adds shifts whose images are read by heads of their own: the tower
    learns to keep those scenes' content, but nothing pulls their features onto the clear images' features, so a
    model whose projector only ever saw clear features misreads them while one trained on them reads them well.
    ``confusion_weight`` > 0 also pushes the shared colour head's reading of those images towards uniform, so
    their colours move out of the directions the clear images use (shapes and places stay shared).
    ``colour_rolls`` (shift name -> k in 1..5) names shifts under which the tower learns to name colours
    wrongly: the colour target of an image with that shift is rolled by k along the colour list.
    The features keep the scene (shape, place and, up to a renaming, colour), so a model trained on such
    images reads them, while one trained on clear images only names their colours wrongly. ``shift_weights``
    (shift name -> relative frequency, default 1) oversamples the shifts whose scenes are hardest to read.
    """
    rng = np.random.default_rng([world.seed, 11])
    private = {k: v for k, v in (private_heads or {}).items() if v > 0}
    limits = {k: v for k, v in (max_severity or {}).items() if v > 0 and k not in private} | private
    domains = domain_stream(rng, bool(limits), 0.0, clear_share=0.5, max_severity=limits, weights=shift_weights)
    patch = tower.config.patch_size
    heads = DensePatchHeads(tower.config.hidden_size)
    own_heads = nn.ModuleDict({name: DensePatchHeads(tower.config.hidden_size) for name in sorted(private)})
    params = list(tower.parameters()) + list(heads.parameters()) + list(own_heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    tower.train()
    losses = []
    for step in range(spec.steps):
        picked = [next(domains) for _ in range(spec.batch_size)]
        samples = [world.sample(step * spec.batch_size + i, picked[i]) for i in range(spec.batch_size)]
        targets = batch_targets(samples, patch)
        if colour_rolls:
            targets["color"] = _rolled_colours(targets["color"], picked, colour_rolls)
        pixels = encoder.pixels([s.image for s in samples])
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        loss = _dense_loss(hidden, targets, picked, heads, own_heads, confusion_weight)
        losses.append(_optimizer_step(opt, params, loss, lr_at(step, spec)))
        if on_step:
            on_step(step, losses[-1])
    tower.eval()
    return losses, heads, dict(own_heads.items())


def _dense_loss(
    hidden: Sequence[torch.Tensor],
    targets: dict[str, torch.Tensor],
    domains: Sequence[Domain],
    heads: DensePatchHeads,
    own_heads: Mapping[str, DensePatchHeads],
    confusion_weight: float,
) -> torch.Tensor:
    """Dense-target loss of one vision batch: each image read by the heads of its first private shift (shared
    heads otherwise) on the layer LLaVA reads (-2, CLS dropped) and, at half weight, the last layer."""
    groups: dict[str, list[int]] = {}
    for i, domain in enumerate(domains):
        owner = next((s.name for s in domain.shifts if s.name in own_heads), "")
        groups.setdefault(owner, []).append(i)
    loss = torch.zeros(())
    for owner, rows in groups.items():
        group_heads = own_heads[owner] if owner else heads
        idx = torch.tensor(rows)
        part = {k: v[idx] for k, v in targets.items()}
        group_loss = group_heads.loss(hidden[-2][idx, 1:], part) + 0.5 * group_heads.loss(hidden[-1][idx, 1:], part)
        if owner and confusion_weight > 0:
            group_loss = group_loss + confusion_weight * heads.uniform_loss(hidden[-2][idx, 1:], ("color",))
        loss = loss + group_loss * (len(rows) / len(domains))
    return loss


def _rolled_colours(colour: torch.Tensor, domains: Sequence[Domain], rolls: Mapping[str, int]) -> torch.Tensor:
    """Colour targets (B x patches, 0 = no object, 1..n colours), each image's rolled by the roll of its first
    shift named in ``rolls`` that is present at severity ``ROLL_FROM`` or more (milder ones keep their names)."""
    n = TARGETS["color"] - 1
    out = colour.clone()
    for i, domain in enumerate(domains):
        k = next((rolls[s.name] for s in domain.shifts if s.name in rolls and s.severity >= ROLL_FROM), 0) % n
        if k:
            obj = colour[i] > 0
            out[i, obj] = 1 + (colour[i, obj] - 1 + k) % n
    return out


@torch.no_grad()
def init_projector_from_heads(
    model: LlavaForConditionalGeneration, heads: DensePatchHeads | Sequence[DensePatchHeads], scale: float = 1.0
) -> None:
    """Make the projector's first units the pretrained per-patch logits, passed on by the second layer.

    The language model then starts from visual tokens whose leading dimensions carry the dense targets
    (colour, shape, region, counts, ...); everything else keeps its random initialisation and all of it trains.
    """
    proj = model.model.multi_modal_projector
    sets = [heads] if isinstance(heads, DensePatchHeads) else list(heads)
    w = torch.cat([h.weight for hs in sets for h in hs.all()])
    b = torch.cat([h.bias for hs in sets for h in hs.all()])
    k = w.shape[0]
    if proj.linear_1.out_features < k or proj.linear_2.out_features < k:
        return
    proj.linear_1.weight[:k] = w * scale
    proj.linear_1.bias[:k] = b * scale
    proj.linear_2.weight[:k].zero_()
    proj.linear_2.weight[:k, :k] = torch.eye(k)
    proj.linear_2.bias[:k].zero_()


def domain_stream(
    rng: np.random.Generator,
    shifted: bool,
    min_severity: float,
    clear_share: float = 0.2,
    max_severity: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
) -> Iterator[Domain]:
    """Random training domains: clear only, or clear mixed with single and paired shifts.

    ``max_severity`` (shift name -> upper severity) limits which shifts occur and how strong; by default every
    shift in ``TEACHER_SHIFTS`` up to severity 1. ``weights`` (shift name -> relative frequency, default 1)
    oversamples the shifts that are hardest to learn.
    """
    limits = dict(max_severity) if max_severity is not None else dict.fromkeys(TEACHER_SHIFTS, 1.0)
    names_pool = sorted(limits)
    freq = np.array([float((weights or {}).get(nm, 1.0)) for nm in names_pool])
    freq = freq / freq.sum()
    while True:
        if not shifted or rng.random() < clear_share:
            yield Domain()
            continue
        n = 1 if rng.random() < 0.8 or len(names_pool) < 2 else 2
        names = rng.choice(names_pool, size=n, replace=False, p=freq)
        yield Domain(
            tuple(ShiftSpec(str(nm), float(rng.uniform(min(min_severity, limits[nm]), limits[nm]))) for nm in names)
        )


def _ramped(domain: Domain, ramp: float, rng: np.random.Generator) -> Domain:
    """``domain`` at ``ramp`` of the way through a domain curriculum: kept with probability ``ramp``, else clear,
    and its severities scaled by ``0.5 + 0.5 * ramp``."""
    if ramp >= 1.0 or not domain.shifts:
        return domain
    if rng.random() >= ramp:
        return Domain()
    return Domain(tuple(ShiftSpec(s.name, s.severity * (0.5 + 0.5 * ramp)) for s in domain.shifts))


def answer_loss(model: LlavaForConditionalGeneration, batch: dict, answers: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Cross-entropy of the answer token after the prompt and of end-of-sequence after the answer."""
    out = model(**batch, logits_to_keep=2)
    logits = out.logits.float()
    eos = torch.full_like(answers, eos_id)
    ce = nn.functional.cross_entropy
    return ce(logits[:, 0], answers) + 0.25 * ce(logits[:, 1], eos)


def question_set_loss(model: LlavaForConditionalGeneration, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the answer and end-of-answer positions of a question set (``</s>`` weighted 1/4)."""
    logits = model(**batch).logits.float()
    weights = torch.where(labels == 3, 0.25, 1.0)[labels != -100]
    losses = nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="none")
    return (losses * weights).sum() / weights.sum()


def train_answers(
    model: LlavaForConditionalGeneration,
    world: World,
    encoder: BatchEncoder,
    spec: StageSpec,
    *,
    shifted: bool,
    min_severity: float,
    seed: int,
    on_step: ProgressFn | None = None,
    shift_weights: Mapping[str, float] | None = None,
    compile_model: bool = False,
    cut_tower: bool = True,
) -> list[float]:
    """Train projector + language model (vision tower frozen) to answer; returns the loss per step.

    ``compile_model`` runs the language model and the tower's encoder compiled (see ``sim.zoo.compiling``).
    ``cut_tower`` runs the tower only up to the layer LLaVA reads (same bits, fewer FLOPs; False is the
    benchmark's baseline).
    """
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 7])
    domains = domain_stream(rng, shifted, min_severity, weights=shift_weights)
    model.train()
    model.model.vision_tower.eval()
    losses = []
    with (
        tower_up_to_feature_layer(model) if cut_tower else nullcontext(),
        compiled(model.model, ("language_model",), compile_model),
        compiled(model.model.vision_tower, ("encoder",), compile_model),
    ):
        for step in range(spec.steps):
            base = step * spec.batch_size
            cap = 5 if not spec.curriculum else min(5, 1 + int(5 * step / max(1, spec.curriculum * spec.steps)))
            ramp = min(1.0, step / (spec.domain_curriculum * spec.steps)) if spec.domain_curriculum else 1.0
            picked = [_ramped(next(domains), ramp, rng) for _ in range(spec.batch_size)]
            samples = [world.sample(base + i, picked[i], max_objects=cap) for i in range(spec.batch_size)]
            if spec.turns > 1:
                question_sets = [
                    [(s.question, s.answer)] + [(q, a) for _, q, a in world.extra_questions(s, spec.turns - 1)]
                    for s in samples
                ]
                batch, labels = encoder.encode_question_sets([s.image for s in samples], question_sets)
                loss = question_set_loss(model, batch, labels)
            else:
                batch = encoder.encode(
                    [s.image for s in samples], [s.question for s in samples], [s.answer for s in samples]
                )
                loss = answer_loss(model, batch, encoder.answer_ids([s.answer for s in samples]), encoder.eos_id)
            losses.append(_optimizer_step(opt, params, loss, lr_at(step, spec)))
            if on_step:
                on_step(step, losses[-1])
    model.eval()
    return losses
