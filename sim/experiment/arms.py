"""The adapting arms of the offline experiment: a device replica, its cloud-side trainer and mirror.

An arm runs one round as the deployed system would: the device answers every stream frame with its current
adapters, picks uploads (UTS, or everything for the send-all baseline), the cloud labels them with the
teacher and distils on a replay buffer (AKD), DWC compresses the change against the device's mirror and
the device applies it (bit-exact against the mirror, checked by digest).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from cloud.akd import AKDConfig, AKDTrainer, TeacherLabels, build_student, teacher_labels
from cloud.dwc import CloudMirror, DWCConfig, compress, full_state_bytes
from common.llava_tokens import PromptBuilder, answer_forward
from common.sample_codec import UploadSample, decode_sample, encode_sample
from common.update_header import INITIAL_VERSION, next_version
from device.update_apply import VersionedAdapter, apply_adapter_update, load_adapter_state
from device.uts import UncertaintyTokenSampler
from sim.experiment.data import FeatureSet


@torch.no_grad()
def accuracy(model: torch.nn.Module, prompts: PromptBuilder, data: FeatureSet, batch: int = 128) -> float:
    """Share of held-out samples whose first answer token is right (all visual tokens)."""
    hits = 0
    for i in range(0, len(data.questions), batch):
        out = answer_forward(model, prompts, list(data.features[i : i + batch]), data.questions[i : i + batch])
        hits += int((out.logits.argmax(-1) == data.answer_ids[i : i + batch]).sum())
    return hits / len(data.questions)


class DeviceReplica:
    """What one device holds: the device model with LoRA adapters and their version."""

    def __init__(self, device_model: torch.nn.Module, akd: AKDConfig, initial: dict[str, torch.Tensor]) -> None:
        self.model = build_student(device_model, akd.adapter).eval()
        self.adapter = VersionedAdapter(INITIAL_VERSION, {k: v.clone() for k, v in initial.items()})
        load_adapter_state(self.model, self.adapter)

    def apply(self, payload: bytes, header) -> None:
        self.adapter = apply_adapter_update(self.adapter, payload, header)
        load_adapter_state(self.model, self.adapter)

    def set_exact(self, state: dict[str, torch.Tensor], version: str) -> None:
        self.adapter = VersionedAdapter(version, {k: v.clone() for k, v in state.items()})
        load_adapter_state(self.model, self.adapter)


@dataclass
class ArmRound:
    """One arm's figures for one round."""

    accuracy: float
    uplink_bytes: int
    uplink_samples: int
    downlink_bytes: int
    wall_s: float
    extra: dict


class AdaptingArm:
    """UTS (or send-everything) -> teacher + AKD -> DWC -> device apply, optionally also tracking an
    uncompressed-downlink twin that holds the cloud's exact target."""

    def __init__(
        self,
        name: str,
        teacher: torch.nn.Module,
        device_model: torch.nn.Module,
        prompts: PromptBuilder,
        akd: AKDConfig,
        uts: UncertaintyTokenSampler | None,
        dwc: DWCConfig,
        replay_rounds: int,
        track_fp32: bool = False,
    ) -> None:
        self.name = name
        self.teacher = teacher
        self.prompts = prompts
        self.uts = uts
        self.dwc = dwc
        self.trainer = AKDTrainer(device_model, teacher.config.text_config.hidden_size, prompts, akd)
        initial = self.trainer.adapter_state()
        self.mirror = CloudMirror(initial)
        self.replica = DeviceReplica(device_model, akd, initial)
        self.fp32 = DeviceReplica(device_model, akd, initial) if track_fp32 else None
        self.buffer: deque[tuple[list[UploadSample], TeacherLabels]] = deque(maxlen=replay_rounds)
        self.initial_bytes = full_state_bytes(initial)

    def _uploads(self, stream: FeatureSet, batch: int = 64) -> tuple[list[bytes], list[int]]:
        """Payloads the device sends this round and the stream positions they came from."""
        model = self.replica.model
        if self.uts is not None:
            self.uts.gate.start_period()
            payloads, picked = [], []
            for i in range(0, len(stream.questions), batch):
                results = self.uts.process(
                    model, self.prompts, stream.features[i : i + batch], stream.questions[i : i + batch]
                )
                for j, r in enumerate(results):
                    if r.sent and r.payload is not None:
                        payloads.append(r.payload)
                        picked.append(i + j)
            return payloads, picked
        payloads = []
        n_tokens = stream.features.shape[1]
        with torch.no_grad():
            for i in range(0, len(stream.questions), batch):
                feats, qs = stream.features[i : i + batch], stream.questions[i : i + batch]
                probs = torch.softmax(answer_forward(model, self.prompts, list(feats), qs).logits, -1)
                top = torch.topk(probs, 5, dim=-1)
                for j in range(len(qs)):
                    sample = UploadSample(
                        feats[j], torch.arange(n_tokens), n_tokens, qs[j], top.indices[j], top.values[j]
                    )
                    payloads.append(encode_sample(sample))
        return payloads, list(range(len(payloads)))

    def _label_accuracy(self, stream: FeatureSet, picked: list[int], labels: TeacherLabels) -> dict[str, float]:
        """How often the teacher's pseudo-answers to this round's uploads are right (a diagnostic the cloud could
        not compute: it needs the world's answers), and, for token-reduced uploads, how often the teacher is right
        on the same frames with every visual token."""
        index = torch.tensor(picked, dtype=torch.long)
        truth = stream.answer_ids[index]
        stats = {"label_accuracy": float((labels.logits.argmax(-1) == truth).float().mean())}
        if self.uts is not None:
            same = FeatureSet(stream.features[index], [stream.questions[i] for i in picked], truth, [])
            stats["label_accuracy_all_tokens"] = accuracy(self.teacher, self.prompts, same)
        return stats

    def run_round(self, stream: FeatureSet, held_out: FeatureSet) -> dict[str, ArmRound]:
        """One round; returns this arm's row (and its fp32 twin's when tracked)."""
        t0 = time.perf_counter()
        payloads, picked = self._uploads(stream)
        t_device = time.perf_counter() - t0
        uploads = [decode_sample(p) for p in payloads]
        t1 = time.perf_counter()
        report = None
        label_stats: dict[str, float] = {}
        if uploads:
            fresh = teacher_labels(self.teacher, self.prompts, uploads)
            self.buffer.append((uploads, fresh))
            label_stats = self._label_accuracy(stream, picked, fresh)
            samples = [s for ups, _ in self.buffer for s in ups]
            labels = TeacherLabels(
                torch.cat([lab.logits for _, lab in self.buffer]),
                torch.cat([lab.hidden for _, lab in self.buffer]),
            )
            report = self.trainer.train(samples, labels)
        target = self.trainer.adapter_state()
        t_train = time.perf_counter() - t1
        t2 = time.perf_counter()
        update = compress(self.mirror, target, self.dwc)
        downlink = 0
        if update.header.units_sent:
            self.replica.apply(update.payload, update.header)
            self.mirror.commit(update)
            if self.replica.adapter.digest() != update.header.result_sha256:  # pragma: no cover - apply checks
                raise RuntimeError("device state diverged from the cloud mirror")
            downlink = update.header.size
        t_dwc = time.perf_counter() - t2
        wall = time.perf_counter() - t0
        extra = {
            "device_s": t_device,
            "train_s": t_train,
            "dwc_s": t_dwc,
            "sent_share": update.sent_share,
            "bits": update.header.bits,
            "kd_before": report.loss_before["kd"] if report else float("nan"),
            "kd_after": report.loss_after["kd"] if report else float("nan"),
            "picked": picked,
            **label_stats,
        }
        rows = {
            self.name: ArmRound(
                accuracy(self.replica.model, self.prompts, held_out),
                sum(len(p) for p in payloads),
                len(payloads),
                downlink,
                wall,
                extra,
            )
        }
        if self.fp32 is not None:
            self.fp32.set_exact(target, next_version(self.fp32.adapter.version))
            rows[f"{self.name}_fp32"] = ArmRound(
                accuracy(self.fp32.model, self.prompts, held_out),
                sum(len(p) for p in payloads),
                len(payloads),
                full_state_bytes(target),
                wall - t_dwc,
                {"device_s": t_device, "train_s": t_train},
            )
        return rows
