"""Accuracy of zoo members on the world: per domain and per question type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LlavaForConditionalGeneration

from sim.world import QUESTION_TYPES, World
from sim.zoo.batching import BatchEncoder

# Held-out samples come from a world seeded apart from every training seed.
EVAL_SEED_OFFSET = 10_000


@dataclass
class Accuracy:
    """Correct / total, overall and per question type."""

    correct: int = 0
    total: int = 0
    by_type: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, qtype: str, ok: bool) -> None:
        self.correct += int(ok)
        self.total += 1
        self.by_type[qtype][0] += int(ok)
        self.by_type[qtype][1] += 1

    @property
    def value(self) -> float:
        return self.correct / max(1, self.total)

    def of_type(self, qtype: str) -> float:
        c, t = self.by_type.get(qtype, (0, 0))
        return c / t if t else float("nan")


@torch.no_grad()
def predict_answers(
    model: LlavaForConditionalGeneration, encoder: BatchEncoder, images: Sequence, questions: Sequence[str]
) -> list[str]:
    """Greedy first answer token for each (image, question): what ``generate`` would answer first."""
    batch = encoder.encode(images, questions)
    logits = model(**batch, logits_to_keep=1).logits[:, -1]
    return encoder.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def evaluate(
    model: LlavaForConditionalGeneration,
    encoder: BatchEncoder,
    domains: Sequence[str],
    *,
    samples_per_domain: int,
    seed: int,
    image_size: int,
    qtypes: Sequence[str] = QUESTION_TYPES,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Accuracy]:
    """Accuracy per domain on held-out samples (the same scenes in every domain)."""
    world = World(seed + EVAL_SEED_OFFSET, image_size)
    model.eval()
    results: dict[str, Accuracy] = {}
    for domain in domains:
        acc = Accuracy()
        for start in range(0, samples_per_domain, batch_size):
            n = min(batch_size, samples_per_domain - start)
            samples = [world.sample(start + i, domain, qtypes[(start + i) % len(qtypes)]) for i in range(n)]
            preds = predict_answers(model, encoder, [s.image for s in samples], [s.question for s in samples])
            for s, p in zip(samples, preds):
                acc.add(s.qtype, p == s.answer)
            if on_batch:
                on_batch(n)
        results[domain] = acc
    return results
