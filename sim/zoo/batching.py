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
        self.mean = torch.tensor(image_mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).reshape(3, 1, 1)
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
        # torch's elementwise kernels give the same float32 bits as numpy's here, in about half the time.
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        batch.mul_(np.float32(1.0 / 255.0)).sub_(self.mean).div_(self.std)
        return batch.contiguous()

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

    def encode_question_sets(
        self, images: Sequence[np.ndarray], question_sets: Sequence[Sequence[tuple[str, str]]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Several questions per image in one sequence that shares the image prefix.

        Layout per row: ``USER : <image>*N`` then, for each (question, answer), ``question ASSISTANT : answer
        </s>``. A block attention mask lets each question see the prefix and itself only, and its position ids
        continue from the prefix, so every question is computed exactly as the single-question prompt
        ``USER: <image>\n{question} ASSISTANT:`` would be, while the image is encoded once.
        Returns model inputs (with a 4D boolean mask) and labels (-100 except where the next token is an answer
        or ``</s>``).
        """
        rows: list[list[int]] = []
        segments: list[list[int]] = []
        positions: list[list[int]] = []
        targets: list[list[int]] = []
        prefix = len(self._prefix)
        for qas in question_sets:
            ids, seg, pos, lab = list(self._prefix), [0] * prefix, list(range(prefix)), [-100] * prefix
            for k, (question, answer) in enumerate(qas):
                answer_id = self.word_ids(answer)[0]
                turn = self.word_ids(question) + self._suffix + [answer_id, self.eos_id]
                ids += turn
                seg += [k + 1] * len(turn)
                pos += list(range(prefix, prefix + len(turn)))
                lab += [-100] * (len(turn) - 3) + [answer_id, self.eos_id, -100]
            rows.append(ids)
            segments.append(seg)
            positions.append(pos)
            targets.append(lab)
        width = max(len(r) for r in rows)
        n = len(rows)
        input_ids = np.full((n, width), self.pad_id, dtype=np.int64)
        seg_ids = np.full((n, width), -1, dtype=np.int64)
        pos_ids = np.zeros((n, width), dtype=np.int64)
        label_ids = np.full((n, width), -100, dtype=np.int64)
        for i in range(n):  # numpy rows from lists: several times faster than a torch.tensor per row
            k = len(rows[i])
            input_ids[i, :k] = rows[i]
            seg_ids[i, :k] = segments[i]
            pos_ids[i, :k] = positions[i]
            label_ids[i, :k] = targets[i]
        input_ids, seg_ids, pos_ids, label_ids = map(torch.from_numpy, (input_ids, seg_ids, pos_ids, label_ids))
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        q_seg, k_seg = seg_ids[:, :, None], seg_ids[:, None, :]
        allowed = causal & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
        allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no empty rows)
        batch = {
            "input_ids": input_ids,
            "attention_mask": allowed[:, None],
            "position_ids": pos_ids,
            "pixel_values": self.pixels(images),
        }
        return batch, label_ids

    def answer_ids(self, answers: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.word_ids(a)[0] for a in answers], dtype=torch.long)
