"""The cloud trainer: scheduler, durable jobs, per-device / per-cohort learner state, validation gate, executors.

Public classes (see docs/cloud-service.md): ``Learner`` (one subject's round: AKD -> gate -> DWC, no network
or Ray), the job recipe around it (``run_job``: hold out by seq, label, round; ``commit_update``), ``Teacher``,
``LearnerStore``, ``Worker``, ``TrainerService``, ``SqliteJobStore``, the executors.
Heavy modules (torch, Ray) are imported on first use of their names.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdaptationConfig": "cloud.adaptation.config",
    "ModelFamily": "cloud.adaptation.config",
    "Job": "cloud.adaptation.jobs",
    "JobError": "cloud.adaptation.jobs",
    "JobStore": "cloud.adaptation.jobs",
    "SqliteJobStore": "cloud.adaptation.job_store",
    "Learner": "cloud.adaptation.learner",
    "RoundResult": "cloud.adaptation.learner",
    "GateReport": "cloud.adaptation.gate",
    "JobSettings": "cloud.adaptation.recipe",
    "JobRound": "cloud.adaptation.recipe",
    "run_job": "cloud.adaptation.recipe",
    "commit_update": "cloud.adaptation.recipe",
    "feature_dim": "cloud.adaptation.recipe",
    "Upload": "cloud.adaptation.uploads",
    "decode_uploads": "cloud.adaptation.uploads",
    "read_raw": "cloud.adaptation.uploads",
    "Teacher": "cloud.adaptation.teacher",
    "LearnerStore": "cloud.adaptation.state",
    "Worker": "cloud.adaptation.worker",
    "JobSpec": "cloud.adaptation.worker",
    "LocalLabeler": "cloud.adaptation.worker",
    "InProcessExecutor": "cloud.adaptation.executor",
    "RayExecutor": "cloud.adaptation.ray_executor",
    "TrainerService": "cloud.adaptation.service",
    "AdaptationMetrics": "cloud.adaptation.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cloud.adaptation' has no attribute {name!r}")
