"""The teacher of a model family: loads it once, labels batches of uploaded samples (soft labels + hidden; with
``max_new_tokens`` > 1 its greedy answer sequence too, which the learner distils token by token)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cloud.akd import TeacherLabels, teacher_labels
from common.llava_tokens import PromptBuilder, unwrap_llava
from common.modeling import load_mllm
from common.sample_codec import UploadSample


def torch_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prompts_for(model: torch.nn.Module, tokenizer) -> PromptBuilder:
    """The prompt builder of the model's family (its image token and chat template)."""
    return PromptBuilder.for_model(model, tokenizer)


@dataclass
class LabelTiming:
    """Throughput of the last ``label`` call."""

    samples: int = 0
    seconds: float = 0.0


class Teacher:
    """A frozen teacher model with its prompt builder."""

    def __init__(
        self, model: torch.nn.Module, prompts: PromptBuilder, batch_size: int = 64, max_new_tokens: int = 1
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.prompts = prompts
        self.batch_size = batch_size
        self.max_new_tokens = max(1, int(max_new_tokens))
        """Tokens of the answer each upload is labelled with (1: the first answer token's distribution only)."""
        self.last = LabelTiming()

    @classmethod
    def load(cls, source: str, device: str = "auto", batch_size: int = 64, max_new_tokens: int = 1) -> Teacher:
        """Load from a directory or hub id (see ``common.modeling.load_mllm``)."""
        loaded = load_mllm(source)
        model = loaded.model.to(torch_device(device))
        return cls(model, prompts_for(model, loaded.processor.tokenizer), batch_size, max_new_tokens)

    @property
    def hidden_size(self) -> int:
        """Width of the teacher's last hidden state (the alignment map's output)."""
        return int(unwrap_llava(self.model).config.text_config.hidden_size)

    def label(self, samples: Sequence[UploadSample]) -> TeacherLabels:
        """Soft labels (and answer sequences when ``max_new_tokens`` > 1) for ``samples`` on the CPU (ValueError on
        an empty batch)."""
        start = time.perf_counter()
        labels = teacher_labels(self.model, self.prompts, samples, self.batch_size, self.max_new_tokens)
        self.last = LabelTiming(len(samples), time.perf_counter() - start)
        return labels
