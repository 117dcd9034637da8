"""The adapting arms of the offline experiment: the device agent's per-frame step and the cloud service's learner,
with no network in between (the fleet simulator runs the same classes behind emulated links).

An arm runs one round as the deployed system does: the device (``device.agent.DeviceModel`` + ``DeviceStep``)
answers every stream frame with its current adapters and UTS picks the uploads (or every frame is sent, for the
send-everything baseline); the cloud runs the trainer's job recipe (``cloud.adaptation.recipe``: decode, hold
out every n-th seq for the validation gate, label with the ``Teacher``, ``Learner`` round: AKD on the rest and
its replay buffer, gate, DWC against the device's mirror); the device applies the update
(``device.update_apply``), bit-exactly the mirror (checked by digest). The ceiling arm runs the same recipe on
the Tandem arm's uploads with the world's answers as labels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cloud.adaptation.learner import Learner
from cloud.adaptation.recipe import JobRound, JobSettings, commit_update, run_job
from cloud.adaptation.teacher import Teacher
from cloud.adaptation.uploads import Upload, decode_uploads
from cloud.akd import AKDConfig, TeacherLabels
from cloud.dwc import DWCConfig, full_state_bytes
from common.llava_tokens import PromptBuilder, answer_forward
from common.sample_codec import UploadSample, encode_sample
from common.update_header import INITIAL_VERSION, next_version
from device.agent import AdapterState, DeviceModel, DeviceStep
from device.update_apply import VersionedAdapter, apply_adapter_update
from device.uts import UncertaintyTokenSampler
from sim.experiment.data import FeatureSet
from sim.experiment.micro import ModelPair
from sim.experiment.truth import true_labels
from sim.fleet.shared_model import shared_copy

OFFLINE_FAMILY = "offline"
"""The model family the experiment's uploads are decoded as (they carry none, so every one is accepted)."""


@torch.no_grad()
def accuracy(model: torch.nn.Module, prompts: PromptBuilder, data: FeatureSet, batch: int = 128) -> float:
    """Share of held-out samples whose first answer token is right (all visual tokens)."""
    hits = 0
    for i in range(0, len(data.questions), batch):
        out = answer_forward(model, prompts, list(data.features[i : i + batch]), data.questions[i : i + batch])
        hits += int((out.logits.argmax(-1) == data.answer_ids[i : i + batch]).sum())
    return hits / len(data.questions)


class DeviceSide:
    """What one device holds: the agent's model (its own LoRA over the shared frozen weights) and per-frame step."""

    def __init__(self, pair: ModelPair, akd: AKDConfig, initial: dict[str, torch.Tensor], uts=None) -> None:
        self.model = DeviceModel(shared_copy(pair.device), pair.processor, akd.adapter, sparse=None)
        self.set_exact(initial, INITIAL_VERSION)
        self.step = DeviceStep(self.model, uts)

    @property
    def adapter(self) -> AdapterState:
        return self.model.adapter

    def apply(self, payload: bytes, header) -> None:
        """The device's apply (verify, dequantize, add), then the swap."""
        current = self.model.adapter
        new = apply_adapter_update(VersionedAdapter(current.version, current.state), payload, header)
        self.step.swap(AdapterState(new.version, new.state))

    def set_exact(self, state: dict[str, torch.Tensor], version: str) -> None:
        self.model.install(AdapterState(version, {k: v.clone() for k, v in state.items()}))


@dataclass
class ArmRound:
    """One arm's figures for one round."""

    accuracy: float
    uplink_bytes: int
    uplink_samples: int
    downlink_bytes: int
    wall_s: float
    extra: dict


@dataclass
class RoundUploads:
    """What a device sent in one round: per upload its seq (the device's counter), payload and stream position."""

    seqs: list[int]
    payloads: list[bytes]
    positions: list[int]

    def rows(self, device_id: str) -> list[tuple[str, int, bytes, dict]]:
        """The uploads as the cloud's sample store hands them to a job."""
        return [(device_id, s, p, {}) for s, p in zip(self.seqs, self.payloads, strict=True)]


class AdaptingArm:
    """UTS (or send-everything) -> the cloud's job recipe (hold out by seq, teacher labels, Learner round: AKD +
    gate + DWC) -> device apply, optionally also tracking an uncompressed-downlink twin that holds the learner's
    exact adapters."""

    def __init__(
        self,
        name: str,
        teacher: Teacher,
        pair: ModelPair,
        akd: AKDConfig,
        uts: UncertaintyTokenSampler | None,
        dwc: DWCConfig,
        replay_samples: int,
        settings: JobSettings | None = None,
        track_fp32: bool = False,
    ) -> None:
        self.name = name
        self.teacher = teacher
        self.prompts = pair.prompts
        self.uts = uts
        self.settings = settings or JobSettings()
        self.learner = Learner(pair.device, teacher.hidden_size, pair.prompts, akd, dwc, replay_samples=replay_samples)
        initial = self.learner.adapters()
        self.device = DeviceSide(pair, akd, initial, uts)
        self.fp32 = DeviceSide(pair, akd, initial) if track_fp32 else None
        self.initial_bytes = full_state_bytes(initial)
        self.last_seq = 0
        self.last: RoundUploads = RoundUploads([], [], [])

    def _payloads(self, stream: FeatureSet, batch: int = 64) -> tuple[list[bytes], list[int]]:
        """Payloads the device sends this round and the stream positions they came from."""
        if self.uts is not None:
            self.uts.gate.start_period()
            payloads, picked = [], []
            for i in range(0, len(stream.questions), batch):
                answers = self.device.step.run_features(stream.features[i : i + batch], stream.questions[i : i + batch])
                for j, a in enumerate(answers):
                    if a.sent and a.payload is not None:
                        payloads.append(a.payload)
                        picked.append(i + j)
            return payloads, picked
        payloads = []
        n_tokens = stream.features.shape[1]
        for i in range(0, len(stream.questions), batch):
            feats, qs = stream.features[i : i + batch], stream.questions[i : i + batch]
            probs = torch.softmax(self.device.model.forward(feats, qs).logits, -1)
            top = torch.topk(probs, 5, dim=-1)
            for j in range(len(qs)):
                sample = UploadSample(feats[j], torch.arange(n_tokens), n_tokens, qs[j], top.indices[j], top.values[j])
                payloads.append(encode_sample(sample))
        return payloads, list(range(len(payloads)))

    def uploads(self, stream: FeatureSet) -> RoundUploads:
        """This round's uploads, numbered on from the last seq as the device's outbox numbers them."""
        payloads, picked = self._payloads(stream)
        seqs = list(range(self.last_seq + 1, self.last_seq + 1 + len(payloads)))
        self.last_seq += len(payloads)
        return RoundUploads(seqs, payloads, picked)

    def label(self, uploads: Sequence[Upload], truth: dict[int, int]) -> TeacherLabels:
        """The teacher's labels (``truth``, seq -> the world's answer id, is for arms that cheat)."""
        return self.teacher.label([u.sample for u in uploads])

    def _label_accuracy(self, stream: FeatureSet, job: JobRound, positions: dict[int, int]) -> dict[str, float]:
        """How often the teacher's pseudo-answers to this round's uploads are right (a diagnostic the cloud could
        not compute: it needs the world's answers), and, for token-reduced uploads, how often the teacher is right
        on the same frames with every visual token."""
        if job.labels is None:
            return {}
        index = torch.tensor([positions[u.seq] for u in job.labelled], dtype=torch.long)
        truth = stream.answer_ids[index]
        stats = {"label_accuracy": float((job.labels.answer_ids == truth).float().mean())}
        if self.uts is not None:
            same = FeatureSet(stream.features[index], [stream.questions[i] for i in index.tolist()], truth, [])
            stats["label_accuracy_all_tokens"] = accuracy(self.teacher.model, self.prompts, same)
        return stats

    def _cloud_round(self, ups: RoundUploads, stream: FeatureSet) -> tuple[JobRound, dict]:
        """What the cloud's worker does with one job's uploads (``cloud.adaptation.recipe.run_job``)."""
        positions = dict(zip(ups.seqs, ups.positions, strict=True))
        truth = {s: int(stream.answer_ids[p]) for s, p in positions.items()}
        decoded = decode_uploads(ups.rows(self.name), OFFLINE_FAMILY, int(stream.features.shape[-1]))
        job = run_job(self.learner, decoded, lambda batch: self.label(batch, truth), self.settings)
        return job, self._label_accuracy(stream, job, positions)

    def run_round(self, stream: FeatureSet, held_out: FeatureSet) -> dict[str, ArmRound]:
        """One round; returns this arm's row (and its fp32 twin's when tracked)."""
        t0 = time.perf_counter()
        self.last = ups = self.uploads(stream)
        t_device = time.perf_counter() - t0
        t1 = time.perf_counter()
        job, label_stats = self._cloud_round(ups, stream) if ups.payloads else (None, {})
        t_cloud = time.perf_counter() - t1
        result = job.result if job is not None else None
        downlink = 0
        if job is not None and job.update is not None:
            self.device.apply(job.update.payload, job.update.header)
            if (
                commit_update(self.learner, job.update) != self.device.adapter.digest()
            ):  # pragma: no cover - apply checks it
                raise RuntimeError("device state diverged from the cloud mirror")
            downlink = job.update.header.size
        wall = time.perf_counter() - t0
        extra = {
            "device_s": t_device,
            "cloud_s": t_cloud,
            "outcome": job.outcome if job is not None else "no uploads",
            "sent_share": result.update.sent_share if result is not None and result.update is not None else 0.0,
            "kd_before": result.akd.loss_before["kd"] if result is not None and result.akd else float("nan"),
            "kd_after": result.akd.loss_after["kd"] if result is not None and result.akd else float("nan"),
            "picked": ups.positions,
            **label_stats,
        }
        up = sum(len(p) for p in ups.payloads)
        rows = {
            self.name: ArmRound(
                accuracy(self.device.model.model, self.prompts, held_out), up, len(ups.payloads), downlink, wall, extra
            )
        }
        if self.fp32 is not None:
            target = self.learner.adapters()
            self.fp32.set_exact(target, next_version(self.fp32.adapter.version))
            rows[f"{self.name}_fp32"] = ArmRound(
                accuracy(self.fp32.model.model, self.prompts, held_out),
                up,
                len(ups.payloads),
                full_state_bytes(target),
                wall,
                {"device_s": t_device, "cloud_s": t_cloud},
            )
        return rows


class CeilingArm(AdaptingArm):
    """The true-label ceiling: the uploads of ``source`` (same seqs, same tokens, same round), labelled with the
    world's answers, through the same recipe, budgets and DWC; the ``source`` arm must run first each round."""

    def __init__(self, name: str, source: AdaptingArm, *args, **kwargs) -> None:
        super().__init__(name, *args, **kwargs)
        self.source = source

    def uploads(self, stream: FeatureSet) -> RoundUploads:
        return self.source.last

    def label(self, uploads: Sequence[Upload], truth: dict[int, int]) -> TeacherLabels:
        answers = torch.tensor([truth[u.seq] for u in uploads], dtype=torch.long)
        return true_labels(super().label(uploads, truth), answers)

    def _label_accuracy(self, stream: FeatureSet, job: JobRound, positions: dict[int, int]) -> dict[str, float]:
        return {}
