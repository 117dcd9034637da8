"""Held-out accuracy of a device's current adapters on its current domain, with the no-adaptation and teacher
references on the same samples. Features are computed once per domain (the tower is frozen and shared), and
each (adapter digest, domain) pair is scored once."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from common.llava_tokens import PromptBuilder, answer_forward
from device.agent import AdapterState, DeviceModel
from sim.fleet.scenario import HELD_OUT_OFFSET
from sim.world import World


@dataclass
class HeldOut:
    """One domain's held-out samples as tower features, questions and answer token ids."""

    features: torch.Tensor
    questions: list[str]
    answer_ids: torch.Tensor


class Evaluator:
    """Scores adapter states on held-out samples; thread-safe (one evaluation at a time)."""

    def __init__(
        self,
        model: DeviceModel,
        teacher: torch.nn.Module,
        teacher_prompts: PromptBuilder,
        world: World,
        samples: int,
        batch: int = 64,
    ) -> None:
        self.model = model
        self.teacher = teacher
        self.teacher_prompts = teacher_prompts
        self.world = world
        self.samples = samples
        self.batch = batch
        self._held: dict[str, HeldOut] = {}
        self._cache: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.initial = model.adapter
        self.evaluations = 0

    def held_out(self, domain: str) -> HeldOut:
        """Held-out samples of ``domain`` (the same scenes in every domain)."""
        if domain not in self._held:
            tok = self.model.tokenizer
            samples = self.world.samples(HELD_OUT_OFFSET, self.samples, domain)
            feats = [
                self.model.features([s.image for s in samples[i : i + self.batch]])
                for i in range(0, len(samples), self.batch)
            ]
            answers = torch.tensor([tok.convert_tokens_to_ids(s.answer) for s in samples])
            self._held[domain] = HeldOut(torch.cat(feats), [s.question for s in samples], answers)
        return self._held[domain]

    @torch.no_grad()
    def _score_device(self, adapter: AdapterState, held: HeldOut) -> float:
        self.model.install(adapter)
        hits = 0
        for i in range(0, len(held.questions), self.batch):
            out = self.model.forward(held.features[i : i + self.batch], held.questions[i : i + self.batch])
            hits += int((out.logits.argmax(-1) == held.answer_ids[i : i + self.batch]).sum())
        self.evaluations += 1
        return hits / len(held.questions)

    @torch.no_grad()
    def _score_teacher(self, held: HeldOut) -> float:
        hits = 0
        for i in range(0, len(held.questions), self.batch):
            feats = list(held.features[i : i + self.batch])
            out = answer_forward(self.teacher, self.teacher_prompts, feats, held.questions[i : i + self.batch])
            hits += int((out.logits.argmax(-1) == held.answer_ids[i : i + self.batch]).sum())
        return hits / len(held.questions)

    def accuracy(self, adapter: AdapterState, domain: str) -> float:
        """Held-out accuracy of ``adapter`` on ``domain`` (cached by digest)."""
        key = (adapter.digest(), domain)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._score_device(adapter, self.held_out(domain))
            return self._cache[key]

    def references(self, domain: str) -> tuple[float, float]:
        """(no adaptation, teacher) on ``domain``'s held-out samples."""
        none = self.accuracy(self.initial, domain)
        key = ("teacher", domain)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._score_teacher(self.held_out(domain))
            return none, self._cache[key]
