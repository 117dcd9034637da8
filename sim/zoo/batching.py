"""Fast batch encoding for training and evaluation, equal to what the saved ``LlavaProcessor`` produces.

The processor handles PIL images one by one; training needs thousands per minute, so this module does the
same normalisation and prompt expansion with numpy/torch directly. ``tests/sim`` checks the equality.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from sim.zoo.tokenizer import IMAGE_TOKEN


class BatchEncoder:
    """Encode (image, question[, answer]) triples into LLaVA model inputs, left-padded."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, num_image_tokens: int, image_mean, image_std) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.mean = np.asarray(image_mean, dtype=np.float32).reshape(1, 1, 1, 3)
        self.std = np.asarray(image_std, dtype=np.float32).reshape(1, 1, 1, 3)
        vocab = tokenizer.get_vocab()
        self.image_id = vocab[IMAGE_TOKEN]
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self._prefix = [vocab["USER"], vocab[":"]] + [self.image_id] * num_image_tokens
        self._suffix = [vocab["ASSISTANT"], vocab[":"]]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_processor(cls, processor) -> BatchEncoder:
        ip = processor.image_processor
        side = ip.crop_size["height"] // processor.patch_size
        num_tokens = side * side + processor.num_additional_image_tokens
        if processor.vision_feature_select_strategy == "default":
            num_tokens -= 1
        return cls(processor.tokenizer, num_tokens, ip.image_mean, ip.image_std)

    def word_ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 HxWx3 images -> normalised float32 Bx3xHxW."""
        arr = np.stack(images).astype(np.float32) * (1.0 / 255.0)
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    def encode(
        self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompt ids (plus the answer token when given), attention mask, position ids and pixels."""
        rows = []
        for i, q in enumerate(questions):
            ids = self._prefix + self.word_ids(q) + self._suffix
            if answers is not None:
                ids = ids + self.word_ids(answers[i])[:1]
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "pixel_values": self.pixels(images),
        }

    def encode_conversations(
        self, images: Sequence[np.ndarray], turns: Sequence[Sequence[tuple[str, str]]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Multi-turn training conversations, as the chat template writes them:
        ``USER: <image>\n q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...``.

        Returns model inputs and ``labels`` (-100 except where the next token is an answer or ``</s>``).
        """
        vocab = self.tokenizer.get_vocab()
        user = [vocab["USER"], vocab[":"]]
        rows, targets = [], []
        for qas in turns:
            ids: list[int] = []
            labels: list[int] = []
            for k, (question, answer) in enumerate(qas):
                head = (self._prefix if k == 0 else user) + self.word_ids(question) + self._suffix
                ids += head
                labels += [-100] * (len(head) - 1) + [self.word_ids(answer)[0]]
                ids += [self.word_ids(answer)[0], self.eos_id]
                labels += [self.eos_id, -100]
            rows.append(ids)
            targets.append(labels)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, targets)):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            label_ids[i, width - len(r) :] = torch.tensor(lab)
            mask[i, width - len(r) :] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "pixel_values": self.pixels(images),
        }
        return batch, label_ids

    def answer_ids(self, answers: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.word_ids(a)[0] for a in answers], dtype=torch.long)
