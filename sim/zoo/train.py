"""Zoo training stages: dense vision pretraining (clear only), then answer training of teacher and device.

Stage 1 pretrains the shared CLIP vision tower on per-patch labels (colour, shape, object centre) of the clear
domain, as CLIP was pretrained on its own data. Stage 2 trains a LLaVA model's projector and language model with
the vision tower frozen: the teacher on every domain, the device model on the clear domain only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionModel, LlavaForConditionalGeneration

from sim.world import COLORS, SHAPES, World
from sim.world.dataset import patch_labels
from sim.world.shifts import Domain, ShiftSpec
from sim.zoo.batching import BatchEncoder
from sim.zoo.recipe import StageSpec

ProgressFn = Callable[[int, float], None]
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


class DensePatchHeads(nn.Module):
    """Per-patch classifiers used only to pretrain the vision tower."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.color = nn.Linear(hidden, len(COLORS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.centre = nn.Linear(hidden, 2)

    def loss(self, feats: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ce = nn.functional.cross_entropy
        c, s, k = labels
        return (
            ce(self.color(feats).flatten(0, 1), c.flatten())
            + ce(self.shape(feats).flatten(0, 1), s.flatten())
            + ce(self.centre(feats).flatten(0, 1), k.flatten(), weight=torch.tensor([1.0, 4.0]))
        )


def pretrain_vision(
    tower: CLIPVisionModel,
    world: World,
    encoder: BatchEncoder,
    spec: StageSpec,
    on_step: ProgressFn | None = None,
    max_severity: float = 0.0,
) -> tuple[list[float], DensePatchHeads]:
    """Train the vision tower on per-patch labels; returns the loss per step and the heads.

    Half of the images are clear, the other half carry one random shift of severity up to ``max_severity``
    (0: clear only). Benchmark-strength shifts (severity 1) stay out of distribution for the tower.
    """
    rng = np.random.default_rng([world.seed, 11])
    domains = domain_stream(rng, max_severity > 0, 0.0, max_severity, clear_share=0.5)
    patch = tower.config.patch_size
    heads = DensePatchHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    tower.train()
    losses = []
    for step in range(spec.steps):
        samples = [world.sample(step * spec.batch_size + i, next(domains)) for i in range(spec.batch_size)]
        labels = [patch_labels(s, patch) for s in samples]
        stacked = tuple(torch.from_numpy(np.stack([lab[i] for lab in labels])) for i in range(3))
        pixels = encoder.pixels([s.image for s in samples])
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        # Supervise the layer LLaVA reads (-2, CLS dropped) and the last layer.
        loss = heads.loss(hidden[-2][:, 1:], stacked) + 0.5 * heads.loss(hidden[-1][:, 1:], stacked)
        losses.append(_optimizer_step(opt, params, loss, lr_at(step, spec)))
        if on_step:
            on_step(step, losses[-1])
    tower.eval()
    return losses, heads


@torch.no_grad()
def init_projector_from_heads(model: LlavaForConditionalGeneration, heads: DensePatchHeads, scale: float = 1.0) -> None:
    """Make the projector's first units the pretrained per-patch logits, passed on by the second layer.

    The language model then starts from visual tokens whose leading dimensions name colour, shape and object
    centre; everything else keeps its random initialisation and all of it trains.
    """
    proj = model.model.multi_modal_projector
    w = torch.cat([heads.color.weight, heads.shape.weight, heads.centre.weight])
    b = torch.cat([heads.color.bias, heads.shape.bias, heads.centre.bias])
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
    max_severity: float = 1.0,
    clear_share: float = 0.2,
) -> Iterator[Domain]:
    """Random training domains: clear only, or clear mixed with single and paired shifts."""
    while True:
        if not shifted or rng.random() < clear_share:
            yield Domain()
            continue
        n = 1 if rng.random() < 0.8 else 2
        names = rng.choice(TEACHER_SHIFTS, size=n, replace=False)
        yield Domain(tuple(ShiftSpec(str(nm), float(rng.uniform(min_severity, max_severity))) for nm in names))


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
) -> list[float]:
    """Train projector + language model (vision tower frozen) to answer; returns the loss per step."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 7])
    domains = domain_stream(rng, shifted, min_severity)
    model.train()
    model.model.vision_tower.eval()
    losses = []
    for step in range(spec.steps):
        base = step * spec.batch_size
        cap = 5 if not spec.curriculum else min(5, 1 + int(5 * step / max(1, spec.curriculum * spec.steps)))
        samples = [world.sample(base + i, next(domains), max_objects=cap) for i in range(spec.batch_size)]
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
