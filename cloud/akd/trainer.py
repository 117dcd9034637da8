"""AKD, adapter-based knowledge distillation of the teacher into the device's adapters.

loss = w_ce * CE(student, teacher's pseudo-answer)
     + w_kd * T^2 * KL(teacher_T || student_T) on the answer token
     + w_align * MSE(align(student last hidden), teacher last hidden)

With sequence labels (the teacher answered in several tokens) the student reads the teacher's answer (teacher
forcing): CE and KL are averaged over every token of it, end-of-sequence included; the alignment stays on the
first answer position.

``align`` is a learned linear map student-hidden -> teacher-hidden that lives on the cloud only and is never
exported. Only the LoRA adapters and the map train. A step that yields a non-finite loss aborts the run and
restores the adapters and optimiser to their state before ``train`` (nothing half-trained is kept).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from pydantic import Field

from cloud.akd.student import AdapterConfig, adapter_state, build_student, export_adapter
from cloud.akd.teacher import TeacherLabels
from common.config import StrictConfig
from common.errors import TandemError
from common.llava_tokens import PromptBuilder, answer_forward, unwrap_llava, upload_positions
from common.sample_codec import UploadSample


class AKDError(TandemError):
    """Distillation cannot run on the given input (empty batch, mismatched labels, diverged loss)."""


class AKDConfig(StrictConfig):
    """Distillation settings (loss weights, temperature, schedule)."""

    adapter: AdapterConfig = AdapterConfig()
    w_ce: float = Field(1.0, ge=0)
    w_kd: float = Field(1.0, ge=0)
    w_align: float = Field(0.1, ge=0)
    temperature: float = Field(2.0, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    min_teacher_confidence: float = Field(0.0, ge=0, le=1)
    confidence_weighting: bool = False
    """Weight each sample's CE and KD terms by the teacher's confidence (normalised to mean 1 per batch)."""
    seed: int = 0


@dataclass
class AKDReport:
    """What one ``train`` call did."""

    samples: int
    steps: int
    loss_before: dict[str, float]
    loss_after: dict[str, float]
    history: list[float] = field(default_factory=list)


class AKDTrainer:
    """Owns one device's student (adapters + cloud-only alignment map) and its optimiser."""

    def __init__(
        self,
        device_model: torch.nn.Module,
        teacher_hidden_size: int,
        prompts: PromptBuilder,
        config: AKDConfig | None = None,
    ) -> None:
        self.config = config or AKDConfig()
        self.prompts = prompts
        self.student = build_student(device_model, self.config.adapter)
        hidden = unwrap_llava(self.student).config.text_config.hidden_size
        torch.manual_seed(self.config.seed)
        self.align = torch.nn.Linear(hidden, teacher_hidden_size)
        self.vocab = unwrap_llava(self.student).lm_head.out_features
        params = [p for p in self.student.parameters() if p.requires_grad] + list(self.align.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self._gen = torch.Generator().manual_seed(self.config.seed)

    # -- losses -----------------------------------------------------------------------------------------
    def losses(
        self, samples: Sequence[UploadSample], labels: TeacherLabels, weights: AKDConfig | None = None
    ) -> dict[str, torch.Tensor]:
        """The three loss terms and their weighted total for one batch (graph kept for backward)."""
        cfg = weights or self.config
        feats, questions = [s.features for s in samples], [s.question for s in samples]
        t = cfg.temperature
        where = upload_positions(samples)
        if labels.is_sequence:
            forced = [seq[:-1] for seq in labels.sequences]  # type: ignore[union-attr]
            out = answer_forward(self.student, self.prompts, feats, questions, continuation=forced, **where)
            ce, kd = self._sequence_terms(out.step_logits.float(), labels, t)  # type: ignore[union-attr]
            first_hidden = out.step_hidden[:, 0]  # type: ignore[index]
        else:
            out = answer_forward(self.student, self.prompts, feats, questions, **where)
            ce, kd = self._first_token_terms(out.logits.float(), labels, t, cfg.confidence_weighting)
            first_hidden = out.hidden
        # losses in fp32 whatever the base's dtype (a checkpoint stored in fp16 or bf16, as the shape members are)
        align = F.mse_loss(self.align(first_hidden.float()), labels.hidden.float())
        total = cfg.w_ce * ce + cfg.w_kd * kd + cfg.w_align * align
        return {"total": total, "ce": ce, "kd": kd, "align": align}

    def _first_token_terms(
        self, logits: torch.Tensor, labels: TeacherLabels, t: float, weighted: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CE on the teacher's answer and T^2 * KL to its distribution, optionally weighted by its confidence."""
        log_p, log_q = F.log_softmax(logits / t, dim=-1), F.log_softmax(labels.logits / t, dim=-1)
        if weighted:
            w = self._confidence_weights(labels)
            ce = (w * F.cross_entropy(logits, labels.answer_ids, reduction="none")).mean()
            kd = (t * t) * (w * F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)).mean()
        else:
            ce = F.cross_entropy(logits, labels.answer_ids)
            kd = (t * t) * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
        return ce, kd

    @staticmethod
    def _sequence_terms(
        step_logits: torch.Tensor, labels: TeacherLabels, t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CE on the teacher's tokens and T^2 * KL to its step distributions, over each row's forced tokens."""
        mask = labels.forced_mask.to(step_logits.device)
        width = step_logits.shape[1]
        rows = [s + [0] * (width - len(s)) for s in labels.sequences]  # type: ignore[union-attr]
        targets = torch.tensor(rows, device=step_logits.device)
        logits, teacher = step_logits[mask], labels.step_logits[:, :width][mask]  # type: ignore[index]
        ce = F.cross_entropy(logits, targets[mask])
        kd = (t * t) * F.kl_div(
            F.log_softmax(logits / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return ce, kd

    @staticmethod
    def _confidence_weights(labels: TeacherLabels) -> torch.Tensor:
        """Per-sample loss weights: the teacher's confidence normalised to mean 1 over the batch."""
        conf = labels.confidence.to(labels.logits.device)
        return conf / conf.mean().clamp_min(1e-8)

    @torch.no_grad()
    def evaluate(self, samples: Sequence[UploadSample], labels: TeacherLabels) -> dict[str, float]:
        """Mean loss terms over ``samples`` without training."""
        self._check(samples, labels)
        sums: dict[str, float] = {}
        for idx in self._batches(len(samples), shuffle=False):
            part = self.losses([samples[i] for i in idx], labels.subset(idx))
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
        return {k: v / len(samples) for k, v in sums.items()}

    # -- training ---------------------------------------------------------------------------------------
    def _check(self, samples: Sequence[UploadSample], labels: TeacherLabels) -> None:
        if len(samples) == 0:
            raise AKDError("no samples to distil on (empty batch)")
        if labels.logits.shape[0] != len(samples) or labels.hidden.shape[0] != len(samples):
            raise AKDError(f"{labels.logits.shape[0]} teacher labels for {len(samples)} samples")
        if labels.logits.shape[1] != self.vocab:
            raise AKDError(f"teacher vocabulary {labels.logits.shape[1]} differs from the student's {self.vocab}")
        if labels.hidden.shape[1] != self.align.out_features:
            raise AKDError(f"teacher hidden size {labels.hidden.shape[1]} differs from {self.align.out_features}")
        if not (torch.isfinite(labels.logits).all() and torch.isfinite(labels.hidden).all()):
            raise AKDError("teacher labels hold NaN or inf")

    def _batches(self, n: int, shuffle: bool) -> list[list[int]]:
        order = torch.randperm(n, generator=self._gen).tolist() if shuffle else list(range(n))
        bs = self.config.batch_size
        return [order[i : i + bs] for i in range(0, n, bs)]

    def train(self, samples: Sequence[UploadSample], labels: TeacherLabels) -> AKDReport:
        """Distil for ``epochs`` over ``samples``; samples whose teacher confidence is below the floor are
        skipped. On a non-finite loss, restores the state from before the call and raises AKDError."""
        self._check(samples, labels)
        keep = torch.nonzero(labels.confidence >= self.config.min_teacher_confidence).flatten().tolist()
        if not keep:
            raise AKDError("no sample passes the teacher-confidence floor")
        samples, labels = [samples[i] for i in keep], labels.subset(keep)
        snapshot = (
            adapter_state(self.student),
            copy.deepcopy(self.align.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
        )
        before = self.evaluate(samples, labels)
        history: list[float] = []
        self.student.train()
        try:
            for _ in range(self.config.epochs):
                for idx in self._batches(len(samples), shuffle=True):
                    loss = self.losses([samples[i] for i in idx], labels.subset(idx))["total"]
                    if not math.isfinite(float(loss.detach())):
                        raise AKDError("distillation loss became NaN or inf; adapters restored")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                    self.optimizer.step()
                    history.append(float(loss.detach()))
        except AKDError:
            self.load_adapter_state(snapshot[0])
            self.align.load_state_dict(snapshot[1])
            self.optimizer.load_state_dict(snapshot[2])
            raise
        finally:
            self.student.eval()
        after = self.evaluate(samples, labels)
        return AKDReport(len(samples), len(history), before, after, history)

    # -- adapters ---------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Current adapter weights (PEFT names, fp32 copies): the DWC target."""
        return adapter_state(self.student)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the adapters (e.g. to roll back)."""
        set_peft_model_state_dict(self.student, state)

    def export(self, directory: str | Path) -> Path:
        """Adapters in PEFT format (the alignment map is not part of it)."""
        return export_adapter(self.student, directory)
