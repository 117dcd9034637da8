"""One adaptation job, top to bottom: decoded uploads (``uploads.decode_uploads``) -> hold out (by seq) -> label
-> learner round; ``commit_update`` once the update is published.

The trainer's worker (and so the service the fleet simulator runs), the offline experiment and the fleet report's
ceiling replay all run a job through ``run_job``; only what labels the uploads differs (the family's teacher, or,
for the true-label ceilings, the world's answers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cloud.adaptation.learner import Learner, RoundResult
from cloud.adaptation.uploads import JobUploads, Upload
from cloud.akd import TeacherLabels
from cloud.dwc import DWCUpdate
from common.mllm_family import family_of

LabelFn = Callable[[Sequence[Upload]], TeacherLabels]
"""Labels uploads (one label per upload, in order)."""


@dataclass(frozen=True)
class JobSettings:
    """A job's settings beside the learner's: which seqs are held out, how the gate judges, the DWC byte budget
    (None: the learner's DWC default)."""

    held_out_every: int = 5
    margin: float = 0.02
    min_held_out: int = 4
    budget_bytes: int | None = None


@dataclass
class JobRound:
    """What a job did: the decoded uploads, the labels in ``labelled`` order (held-out first), and the round's
    result (None when nothing was left to train on)."""

    decoded: JobUploads
    held: list[Upload] = field(default_factory=list)
    train: list[Upload] = field(default_factory=list)
    labels: TeacherLabels | None = None
    result: RoundResult | None = None
    label_s: float = 0.0

    @property
    def labelled(self) -> list[Upload]:
        """The uploads in the order of ``labels``."""
        return self.held + self.train

    @property
    def outcome(self) -> str:
        """published / refused / unchanged, 'no samples' or 'held out' (every new sample went to the gate)."""
        if self.result is not None:
            return self.result.outcome
        return "held out" if self.held else "no samples"

    @property
    def update(self) -> DWCUpdate | None:
        """The update to publish, if any."""
        return self.result.update if self.result is not None and self.result.outcome == "published" else None


def feature_dim(model: torch.nn.Module) -> int:
    """Width of the tower features the model's projector takes (what ``decode_uploads`` checks uploads against;
    per family, ``common.mllm_family``); a plain model or a learner's PeftModel student."""
    return family_of(model).feature_dim(model)


def split_held_out(uploads: Sequence[Upload], every: int) -> tuple[list[Upload], list[Upload]]:
    """Uploads whose seq is a multiple of ``every`` (held out for the gate) and the rest (trained on)."""
    return [u for u in uploads if u.seq % every == 0], [u for u in uploads if u.seq % every != 0]


def run_job(learner: Learner, decoded: JobUploads, label: LabelFn, settings: JobSettings) -> JobRound:
    """Hold out, label (held-out and training uploads in one call), add the held-out ones to the gate's set,
    and run the learner's round on the rest. The caller publishes ``job.update`` and then calls ``commit_update``."""
    job = JobRound(decoded)
    if not decoded.uploads:
        return job
    job.held, job.train = split_held_out(decoded.uploads, settings.held_out_every)
    ups = job.labelled
    t0 = time.perf_counter()
    job.labels = label(ups)
    job.label_s = time.perf_counter() - t0
    n = len(job.held)
    learner.add_held_out([u.payload for u in job.held], [u.sample for u in job.held], job.labels.subset(range(n)))
    if not job.train:
        return job
    job.result = learner.run_round(
        [u.payload for u in job.train],
        [u.sample for u in job.train],
        job.labels.subset(range(n, len(ups))),
        margin=settings.margin,
        min_held_out=settings.min_held_out,
        budget_bytes=settings.budget_bytes,
    )
    return job


def commit_update(learner: Learner, update: DWCUpdate) -> str:
    """The update is published: advance the learner's mirror; returns the digest of what the device will hold."""
    learner.commit(update)
    return learner.mirror_digest()
