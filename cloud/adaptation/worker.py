"""Runs one adaptation job wherever it is placed (in the service's process or in a Ray learner actor).

The worker holds nothing between jobs but the device base models it has loaded: the learner of each job is
rebuilt from disk (``LearnerStore``), so a job retried on a fresh actor resumes from the last saved state, and
GPU memory is released when the job ends.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from cloud.adaptation.config import AdaptationConfig, ModelFamily
from cloud.adaptation.learner import Learner
from cloud.adaptation.recipe import JobSettings, commit_update, feature_dim, run_job
from cloud.adaptation.state import LearnerStore
from cloud.adaptation.teacher import Teacher, prompts_for, torch_device
from cloud.adaptation.uploads import decode_uploads
from cloud.akd import TeacherLabels
from cloud.feature_bases import load_known_bases
from common.faults import fault_point
from common.modeling import load_mllm
from common.sample_codec import UploadSample
from common.update_header import header_to_json

SKIPPED_KEPT = 50
"""Skipped uploads listed (with their reasons) in a job's record; ``skipped_count`` has them all."""


class Labeler(Protocol):
    """Gives teacher labels for a family's uploads (an in-process teacher or a Ray teacher actor)."""

    def hidden_size(self, family: str) -> int: ...

    def label(self, family: str, payloads: list[bytes], samples: list[UploadSample]) -> TeacherLabels: ...


class LocalLabeler:
    """Teachers loaded in this process, one per family, on first use."""

    def __init__(self, config: AdaptationConfig) -> None:
        self.config = config
        self.teachers: dict[str, Teacher] = {}

    def teacher(self, family: str) -> Teacher:
        if family not in self.teachers:
            fam, cfg = self.config.families[family], self.config
            self.teachers[family] = Teacher.load(
                fam.teacher_model, cfg.device, cfg.label_batch_size, fam.answer_tokens()
            )
        return self.teachers[family]

    def hidden_size(self, family: str) -> int:
        return self.teacher(family).hidden_size

    def label(self, family: str, payloads: list[bytes], samples: list[UploadSample]) -> TeacherLabels:
        return self.teacher(family).label(samples)


@dataclass
class JobSpec:
    """Everything a worker needs for one job (the samples travel with it)."""

    job_id: int
    key: str
    subject_kind: str
    subject: str
    family: str
    rows: list[tuple[str, int, bytes, dict]]
    budget_bytes: int | None = None
    rebase_to: str | None = None


@dataclass
class JobResult:
    """What a job produced; ``payload``/``header_json``/``generation`` are set for an update to publish."""

    outcome: str
    summary: dict = field(default_factory=dict)
    payload: bytes | None = None
    header_json: str | None = None
    generation: int | None = None


class Worker:
    """Builds learners for jobs and runs their rounds."""

    def __init__(self, config: AdaptationConfig, state_dir: str | Path, labeler: Labeler) -> None:
        self.config = config
        self.akd = config.akd_config()
        self.dwc = config.dwc_config()
        self.store = LearnerStore(state_dir)
        self.labeler = labeler
        self.device = torch_device(config.device)
        self._models: dict[str, tuple[torch.nn.Module, object]] = {}
        load_known_bases(config)  # format /2 uploads decode on these

    def _device_model(self, family: ModelFamily) -> tuple[torch.nn.Module, object]:
        if family.device_model not in self._models:
            loaded = load_mllm(family.device_model)
            model = loaded.model.requires_grad_(False)
            self._models[family.device_model] = (model, prompts_for(model, loaded.processor.tokenizer))
        return self._models[family.device_model]

    def build_learner(self, family_name: str) -> Learner:
        """A fresh learner of ``family_name`` (the version-0 state both sides derive from the seed)."""
        family = self.config.families[family_name]
        model, prompts = self._device_model(family)
        return Learner(
            model,
            self.labeler.hidden_size(family_name),
            prompts,
            self.akd,
            self.dwc,
            replay_samples=self.config.replay_samples,
            held_out_max=self.config.gate.held_out_max,
            mirror_history=self.config.mirror_history,
            initial_version=family.initial_version,
            device=self.device,
        )

    def load_learner(self, key: str, family_name: str) -> Learner:
        """The subject's learner as last saved (fresh when it never ran)."""
        learner = self.build_learner(family_name)
        if self.store.exists(key):
            self.store.restore(key, learner)
        return learner

    def run(self, spec: JobSpec) -> JobResult:
        """Run a job; GPU memory the job allocated is released before returning."""
        try:
            return self._run(spec)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _run(self, spec: JobSpec) -> JobResult:
        pending = self.store.pending(spec.key)
        if pending is not None and pending.job_id == spec.job_id:
            return JobResult("published", {"resumed": True}, pending.payload, pending.header_json, pending.generation)
        if pending is not None:
            self.store.discard_pending(spec.key)
        t0 = time.perf_counter()
        family = self.config.families[spec.family]
        model, _ = self._device_model(family)
        decoded = decode_uploads(spec.rows, spec.family, feature_dim(model))
        summary: dict = {
            "samples": len(decoded.uploads),
            "skipped": decoded.skipped[:SKIPPED_KEPT],
            "skipped_count": len(decoded.skipped),
            "upload_bytes": decoded.bytes,
        }
        if not decoded.uploads:
            reason = "no usable samples" if decoded.skipped else "no samples in the job's ranges"
            return JobResult("skipped", {**summary, "reason": reason})
        learner = self.load_learner(spec.key, spec.family)
        gate = self.config.gate
        if spec.rebase_to is not None and spec.rebase_to != learner.mirror.version:
            learner.rebase(spec.rebase_to)
            summary["rebased_to"] = spec.rebase_to
        settings = JobSettings(gate.held_out_every, gate.margin, gate.min_held_out, spec.budget_bytes)
        fault_point("cloud.job_round")  # test-only: hold or kill a job mid-way (common/faults.py)
        job = run_job(learner, decoded, self._label_fn(spec.family), settings)
        summary["label_s"] = job.label_s
        if job.result is None:
            return self._save_live(spec, learner, {**summary, "reason": "every new sample was held out"})
        result = job.result
        summary.update(result.summary())
        summary["job_s"] = time.perf_counter() - t0
        if result.outcome != "published" or result.update is None:
            return self._save_live(spec, learner, summary, result.outcome)
        header = result.update.header
        header = header.addressed(*((spec.subject, "") if spec.subject_kind == "device" else ("", spec.subject)))
        header = dataclasses.replace(header, metadata={**header.metadata, "job_id": str(spec.job_id)})
        summary["mirror_digest"] = commit_update(learner, result.update)
        pending = self.store.save_pending(spec.key, learner, spec.job_id, result.update.payload, header_to_json(header))
        return JobResult("published", summary, pending.payload, pending.header_json, pending.generation)

    def _label_fn(self, family: str):
        return lambda ups: self.labeler.label(family, [u.payload for u in ups], [u.sample for u in ups])

    def _save_live(self, spec: JobSpec, learner: Learner, summary: dict, outcome: str = "unchanged") -> JobResult:
        gen = self.store.save(spec.key, learner, spec.job_id)
        self.store.promote(spec.key, gen)
        return JobResult(outcome, summary)
