"""One subject's cloud-side learner and the adaptation round it runs (usable in-process, without network or Ray).

A round reads top to bottom: hold out -> pool with replay -> distil (AKD) -> validate (gate) -> compress (DWC
against the mirror). Publishing is the caller's; once published, ``commit`` advances the mirror. The offline
experiment and the fleet simulator drive this same class.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from cloud.adaptation.gate import GateReport, validate
from cloud.akd import AKDConfig, AKDReport, AKDTrainer, LabelRow, TeacherLabels
from cloud.dwc import CloudMirror, DWCConfig, DWCUpdate, compress
from common.delta_codec import state_digest
from common.sample_codec import UploadSample
from common.update_header import INITIAL_VERSION, UpdateError, next_version, version_counter

Outcome = Literal["published", "refused", "unchanged"]


@dataclass
class LabelledBuffer:
    """A bounded FIFO of uploads (raw payload bytes and decoded) with their teacher labels."""

    capacity: int
    payloads: list[bytes] = field(default_factory=list)
    samples: list[UploadSample] = field(default_factory=list)
    rows: list[LabelRow] = field(default_factory=list)
    """Each upload's labels (with the teacher's answer sequence when it labelled with one)."""

    def extend(self, payloads: Sequence[bytes], samples: Sequence[UploadSample], labels: TeacherLabels) -> None:
        for i, (p, s) in enumerate(zip(payloads, samples, strict=True)):
            self.payloads.append(p)
            self.samples.append(s)
            self.rows.append(labels.row(i))
        drop = max(0, len(self.samples) - self.capacity)
        for lst in (self.payloads, self.samples, self.rows):
            del lst[:drop]

    def labels(self) -> TeacherLabels:
        return TeacherLabels.from_rows(self.rows)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class RoundResult:
    """What one round produced: an update to publish (``outcome == 'published'``), or why not."""

    outcome: Outcome
    update: DWCUpdate | None
    gate: GateReport
    akd: AKDReport | None
    trained_on: int
    seconds: dict[str, float]

    def summary(self) -> dict:
        """JSON-able figures for the job record."""
        out = {
            "outcome": self.outcome,
            "gate": self.gate.as_dict(),
            "trained_on": self.trained_on,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }
        if self.akd is not None:
            out["kd_before"], out["kd_after"] = self.akd.loss_before["kd"], self.akd.loss_after["kd"]
        if self.update is not None:
            h = self.update.header
            out.update(bytes=h.size, bits=h.bits, units=f"{h.units_sent}/{h.units_total}", target=h.target_version)
            out["sent_share"] = round(self.update.sent_share, 4)
        return out


class Learner:
    """A device's (or cohort's) learner: AKD student + alignment map + optimiser, replay and held-out buffers,
    and the DWC mirror of what the device holds, with the version history a rollback can rebase onto."""

    def __init__(
        self,
        device_model: torch.nn.Module,
        teacher_hidden_size: int,
        prompts,
        akd: AKDConfig,
        dwc: DWCConfig,
        *,
        replay_samples: int = 512,
        held_out_max: int = 256,
        mirror_history: int = 16,
        initial_version: str = INITIAL_VERSION,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.trainer = AKDTrainer(device_model, teacher_hidden_size, prompts, akd)
        self.trainer.student.to(self.device)
        self.trainer.align.to(self.device)
        self.dwc = dwc
        self.mirror = CloudMirror(self.adapters(), initial_version)
        self.history: dict[str, dict[str, torch.Tensor]] = {initial_version: self.mirror.state}
        self.history_max = mirror_history
        self.counter = max(version_counter(initial_version), 0)
        self.replay = LabelledBuffer(replay_samples)
        self.held_out = LabelledBuffer(held_out_max)

    # -- the round -----------------------------------------------------------------------------------------
    def adapters(self) -> dict[str, torch.Tensor]:
        """The trainer's current adapters (fp32, CPU): the DWC target."""
        return {k: v.cpu() for k, v in self.trainer.adapter_state().items()}

    def add_held_out(self, payloads: Sequence[bytes], samples: Sequence[UploadSample], labels: TeacherLabels) -> None:
        """Uploads kept for validation only."""
        if samples:
            self.held_out.extend(payloads, samples, labels)

    def run_round(
        self,
        payloads: Sequence[bytes],
        samples: Sequence[UploadSample],
        labels: TeacherLabels,
        *,
        margin: float = 0.02,
        min_held_out: int = 4,
        budget_bytes: int | None = None,
    ) -> RoundResult:
        """Distil on ``samples`` (with the replay buffer), validate against the mirror, compress.

        The learner keeps its trained state unless the gate refuses (then adapters, alignment map and
        optimiser go back to before the round and the uploads are not added to the replay buffer).
        """
        t0 = time.perf_counter()
        snapshot = self._snapshot()
        pool = LabelledBuffer(len(self.replay) + len(samples))
        if len(self.replay):
            pool.extend(self.replay.payloads, self.replay.samples, self.replay.labels())
        pool.extend(payloads, samples, labels)
        report = self.trainer.train(pool.samples, self._on_device(pool.labels()))
        t1 = time.perf_counter()
        candidate = self.adapters()
        held = self.held_out
        gate = validate(
            self.trainer,
            self.mirror.state,
            candidate,
            held.samples,
            self._on_device(held.labels()) if len(held) else labels,
            margin,
            min_held_out,
        )
        t2 = time.perf_counter()
        seconds = {"train": t1 - t0, "gate": t2 - t1}
        if not gate.passed:
            self._restore(snapshot)
            return RoundResult("refused", None, gate, report, len(pool), seconds)
        self.replay.extend(payloads, samples, labels)
        cfg = self.dwc if budget_bytes is None else self.dwc.model_copy(update={"budget_bytes": budget_bytes})
        update = compress(self.mirror, candidate, cfg, target_version=self.next_target())
        seconds["dwc"] = time.perf_counter() - t2
        outcome: Outcome = "published" if update.header.units_sent else "unchanged"
        return RoundResult(outcome, update if update.header.units_sent else None, gate, report, len(pool), seconds)

    def next_target(self) -> str:
        """The next version name: never one this learner issued before, even after a rebase."""
        return next_version(self.mirror.version, at_least=self.counter + 1)

    def commit(self, update: DWCUpdate) -> None:
        """The update is published: advance the mirror and remember the version."""
        self.mirror.commit(update)
        self.history[self.mirror.version] = self.mirror.state
        self.counter = max(self.counter, version_counter(self.mirror.version))
        while len(self.history) > self.history_max:
            oldest = next(iter(self.history))
            if oldest == self.mirror.version:
                break
            del self.history[oldest]

    def rebase(self, version: str) -> None:
        """The device rolled back to ``version``: mirror and adapters return to it, the optimiser restarts."""
        if version not in self.history:
            raise UpdateError(f"cannot rebase onto {version!r}: not in the mirror's history {sorted(self.history)}")
        self.mirror = CloudMirror(self.history[version], version)
        self.trainer.load_adapter_state({k: v.to(self.device) for k, v in self.history[version].items()})
        self.trainer.optimizer.state.clear()

    def mirror_digest(self) -> str:
        """Digest of the exact state the device holds."""
        return state_digest(self.mirror.state)

    # -- helpers -------------------------------------------------------------------------------------------
    def _on_device(self, labels: TeacherLabels) -> TeacherLabels:
        return labels.to(self.device)

    def _snapshot(self):
        return (
            self.adapters(),
            copy.deepcopy(self.trainer.align.state_dict()),
            copy.deepcopy(self.trainer.optimizer.state_dict()),
        )

    def _restore(self, snapshot) -> None:
        adapters, align, optim = snapshot
        self.trainer.load_adapter_state({k: v.to(self.device) for k, v in adapters.items()})
        self.trainer.align.load_state_dict(align)
        self.trainer.optimizer.load_state_dict(optim)
