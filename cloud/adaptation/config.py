"""Settings of the adaptation service (the ``adaptation:`` section of ``deploy/configs/cloud.yaml``).

Importing this module stays free of torch (the gateway role loads it too): the ``akd`` and ``dwc`` sections are
kept as mappings here and validated into ``cloud.akd.AKDConfig`` / ``cloud.dwc.DWCConfig`` by :meth:`akd_config`
and :meth:`dwc_config` when the trainer starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from common.config import StrictConfig, short_validation_message
from common.errors import ConfigError
from common.update_header import INITIAL_VERSION, check_version

REFERENCE_ZOO = Path("sim/zoo/reference/base")


class ModelFamily(StrictConfig):
    """One model family: the device's base model and the teacher that labels its uploads (HF id or directory)."""

    device_model: str = str(REFERENCE_ZOO / "device")
    teacher_model: str = str(REFERENCE_ZOO / "teacher")
    initial_version: str = INITIAL_VERSION
    """The version a freshly enrolled device holds (adapters initialised from ``akd.adapter.seed``)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Answer tokens the teacher labels each upload with (its greedy answer sequence; 1: the first token only).
    None: what the family's device answers with by default, ``max_new_tokens`` of the device model's
    ``generation_config.json`` when ``device_model`` is a directory, else 1 (see :meth:`answer_tokens`)."""

    def answer_tokens(self) -> int:
        """The resolved ``max_new_tokens`` (reads the device model's generation config; no hub access)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        path = Path(self.device_model) / "generation_config.json"
        try:
            stored = json.loads(path.read_text()).get("max_new_tokens") if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            stored = None
        return int(stored) if isinstance(stored, int) and stored >= 1 else 1

    @model_validator(mode="after")
    def _check(self) -> ModelFamily:
        check_version(self.initial_version, "initial_version")
        return self


class TriggerConfig(StrictConfig):
    """When new samples of one device (or cohort) make a job."""

    min_samples: int = Field(64, ge=1)
    min_bytes: int | None = Field(None, ge=1)
    """Also trigger once this many payload bytes arrived (None: count only)."""
    max_interval_s: float = Field(3600.0, gt=0)
    """Trigger on any new sample once this long has passed since the subject's last job."""


class GateConfig(StrictConfig):
    """The validation gate: candidate vs current adapters on held-out uploads, scored by teacher agreement."""

    held_out_every: int = Field(5, ge=2)
    """Every n-th new sample (by seq) is held out from training and joins the validation set."""
    held_out_max: int = Field(256, ge=1)
    min_held_out: int = Field(4, ge=1)
    """Below this many held-out samples the gate passes (recorded as 'too few to judge')."""
    margin: float = Field(0.02, ge=0.0, le=1.0)
    """Refuse a candidate whose teacher agreement is lower than the current adapters' by more than this."""


class LinkBudgetConfig(StrictConfig):
    """How the DWC byte budget of an update is chosen."""

    budget_bytes: int | None = Field(None, ge=1)
    """A fixed budget (overrides the link); None: from the device's reported downlink or the DWC default."""
    seconds_of_link: float = Field(2.0, gt=0)
    """With a reported downlink capacity, the budget is this many seconds of it."""
    min_bytes: int = Field(2048, ge=1)
    max_bytes: int | None = Field(None, ge=1)


class RayConfig(StrictConfig):
    """The Ray executor: actors and their resources."""

    address: str | None = None
    """Join an existing cluster (also RAY_ADDRESS); None starts a local Ray sized to the machine."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray (None: all)."""
    teacher_num_gpus: float = Field(1.0, ge=0.0)
    learner_num_gpus: float = Field(0.25, ge=0.0)
    """Fractional GPUs per learner actor: several device jobs share one GPU."""
    learners: int = Field(2, ge=1)
    teacher_num_cpus: float = Field(0.5, ge=0.0)
    learner_num_cpus: float = Field(0.5, ge=0.0)
    torch_threads: int = Field(1, ge=1)
    """Torch threads inside each actor."""
    include_dashboard: bool = False


class AdaptationConfig(StrictConfig):
    """Everything the trainer needs beside the gateway's stores."""

    families: dict[str, ModelFamily] = Field(default_factory=lambda: {"tandem-zoo": ModelFamily()})
    akd: dict[str, Any] = Field(default_factory=dict)
    """``cloud.akd.AKDConfig`` fields (adapter shape, loss weights, epochs, ...)."""
    dwc: dict[str, Any] = Field(default_factory=dict)
    """``cloud.dwc.DWCConfig`` fields (bits, block, energy share; the budget comes from ``link``)."""
    trigger: TriggerConfig = TriggerConfig()
    cohort_trigger: TriggerConfig = TriggerConfig(min_samples=256)
    cohort_training: bool = False
    """Devices with a cohort train the cohort's shared adapter on their pooled uploads (one job per cohort)."""
    gate: GateConfig = GateConfig()
    link: LinkBudgetConfig = LinkBudgetConfig()
    replay_samples: int = Field(512, ge=0)
    """Recent training uploads kept per learner and trained on again in later jobs."""
    mirror_history: int = Field(16, ge=1)
    """Mirror versions kept per learner, so a device's rollback can rebase onto any of them."""
    max_samples_per_job: int = Field(4096, ge=1)
    label_batch_size: int = Field(64, ge=1)
    max_attempts: int = Field(3, ge=1)
    """A job that fails this many times stays failed (``tandem-cloud jobs retry`` requeues it)."""
    poll_interval_s: float = Field(2.0, gt=0)
    stop_grace_s: float = Field(15.0, ge=0)
    """On SIGTERM/SIGINT, how long running jobs may go on to finish; jobs still running then are requeued."""
    executor: Literal["inprocess", "ray"] = "ray"
    ray: RayConfig = RayConfig()
    state_dir: Path | None = None
    """Learner state and the job database; default ``<data_dir>/adaptation``."""
    device: str = "auto"
    """Torch device for in-process work: auto (cuda when available), cpu or cuda."""

    def akd_config(self):
        """The validated ``AKDConfig`` (imports torch)."""
        from cloud.akd import AKDConfig

        return _validate(AKDConfig, self.akd, "adaptation.akd")

    def dwc_config(self):
        """The validated ``DWCConfig`` (imports torch)."""
        from cloud.dwc import DWCConfig

        return _validate(DWCConfig, self.dwc, "adaptation.dwc")


def _validate(cls, data: dict[str, Any], where: str):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {where}: {short_validation_message(exc)}") from None
