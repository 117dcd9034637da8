"""The adapting arms of the offline experiment: the device agent's per-frame step and the cloud service's learner,
with no network in between (the fleet simulator runs the same classes behind emulated links).

An arm runs one round as the deployed system does: the device (``device.agent.DeviceModel`` + ``DeviceStep``)
answers every stream frame with its current adapters and UTS picks the uploads (or every frame is sent, for the
send-everything baseline); the cloud (``cloud.adaptation.Learner`` with the ``Teacher``) holds out every n-th
upload for its validation gate, labels the rest with the teacher, distils on them and its replay buffer (AKD),
validates the candidate, compresses the change against the device's mirror (DWC); the device applies it
(``device.update_apply``), bit-exactly the mirror (checked by digest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cloud.adaptation.learner import Learner
from cloud.adaptation.teacher import Teacher
from cloud.akd import AKDConfig, TeacherLabels
from cloud.dwc import DWCConfig, full_state_bytes
from common.llava_tokens import PromptBuilder, answer_forward
from common.sample_codec import UploadSample, decode_sample, encode_sample
from common.update_header import INITIAL_VERSION, next_version
from device.agent import AdapterState, DeviceModel, DeviceStep
from device.update_apply import VersionedAdapter, apply_adapter_update
from device.uts import UncertaintyTokenSampler
from sim.experiment.data import FeatureSet
from sim.experiment.micro import ModelPair
from sim.fleet.shared_model import shared_copy


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


def held_out_split(n: int, every: int) -> tuple[list[int], list[int]]:
    """Upload positions the cloud holds out for its gate (every ``every``-th, as the service does by seq) and the
    ones it trains on."""
    held = [i for i in range(n) if (i + 1) % every == 0]
    return held, [i for i in range(n) if (i + 1) % every != 0]


class AdaptingArm:
    """UTS (or send-everything) -> teacher + AKD + gate + DWC (the cloud's Learner) -> device apply, optionally also
    tracking an uncompressed-downlink twin that holds the learner's exact adapters."""

    def __init__(
        self,
        name: str,
        teacher: Teacher,
        pair: ModelPair,
        akd: AKDConfig,
        uts: UncertaintyTokenSampler | None,
        dwc: DWCConfig,
        replay_samples: int,
        held_out_every: int = 5,
        gate_margin: float = 0.02,
        track_fp32: bool = False,
    ) -> None:
        self.name = name
        self.teacher = teacher
        self.prompts = pair.prompts
        self.uts = uts
        self.held_out_every = held_out_every
        self.gate_margin = gate_margin
        self.learner = Learner(pair.device, teacher.hidden_size, pair.prompts, akd, dwc, replay_samples=replay_samples)
        initial = self.learner.adapters()
        self.device = DeviceSide(pair, akd, initial, uts)
        self.fp32 = DeviceSide(pair, akd, initial) if track_fp32 else None
        self.initial_bytes = full_state_bytes(initial)

    def _uploads(self, stream: FeatureSet, batch: int = 64) -> tuple[list[bytes], list[int]]:
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

    def _label_accuracy(self, stream: FeatureSet, picked: list[int], labels: TeacherLabels) -> dict[str, float]:
        """How often the teacher's pseudo-answers to this round's uploads are right (a diagnostic the cloud could
        not compute: it needs the world's answers), and, for token-reduced uploads, how often the teacher is right
        on the same frames with every visual token."""
        index = torch.tensor(picked, dtype=torch.long)
        truth = stream.answer_ids[index]
        stats = {"label_accuracy": float((labels.logits.argmax(-1) == truth).float().mean())}
        if self.uts is not None:
            same = FeatureSet(stream.features[index], [stream.questions[i] for i in picked], truth, [])
            stats["label_accuracy_all_tokens"] = accuracy(self.teacher.model, self.prompts, same)
        return stats

    def _cloud_round(self, payloads: list[bytes], picked: list[int], stream: FeatureSet) -> tuple[object, dict]:
        """What the cloud's worker does with one job's uploads: hold out, label, learner round."""
        samples = [decode_sample(p) for p in payloads]
        held, train = held_out_split(len(samples), self.held_out_every)
        labels = self.teacher.label(samples)
        stats = self._label_accuracy(stream, picked, labels)
        self.learner.add_held_out([payloads[i] for i in held], [samples[i] for i in held], labels.subset(held))
        if not train:
            return None, stats
        result = self.learner.run_round(
            [payloads[i] for i in train],
            [samples[i] for i in train],
            labels.subset(train),
            margin=self.gate_margin,
        )
        return result, stats

    def run_round(self, stream: FeatureSet, held_out: FeatureSet) -> dict[str, ArmRound]:
        """One round; returns this arm's row (and its fp32 twin's when tracked)."""
        t0 = time.perf_counter()
        payloads, picked = self._uploads(stream)
        t_device = time.perf_counter() - t0
        t1 = time.perf_counter()
        result, label_stats = self._cloud_round(payloads, picked, stream) if payloads else (None, {})
        t_cloud = time.perf_counter() - t1
        downlink = 0
        if result is not None and result.outcome == "published":
            update = result.update
            self.device.apply(update.payload, update.header)
            self.learner.commit(update)
            if self.device.adapter.digest() != self.learner.mirror_digest():  # pragma: no cover - apply checks it
                raise RuntimeError("device state diverged from the cloud mirror")
            downlink = update.header.size
        wall = time.perf_counter() - t0
        extra = {
            "device_s": t_device,
            "cloud_s": t_cloud,
            "outcome": result.outcome if result is not None else "no uploads",
            "sent_share": result.update.sent_share if result is not None and result.update is not None else 0.0,
            "kd_before": result.akd.loss_before["kd"] if result is not None and result.akd else float("nan"),
            "kd_after": result.akd.loss_after["kd"] if result is not None and result.akd else float("nan"),
            "picked": picked,
            **label_stats,
        }
        up = sum(len(p) for p in payloads)
        rows = {
            self.name: ArmRound(
                accuracy(self.device.model.model, self.prompts, held_out), up, len(payloads), downlink, wall, extra
            )
        }
        if self.fp32 is not None:
            target = self.learner.adapters()
            self.fp32.set_exact(target, next_version(self.fp32.adapter.version))
            rows[f"{self.name}_fp32"] = ArmRound(
                accuracy(self.fp32.model.model, self.prompts, held_out),
                up,
                len(payloads),
                full_state_bytes(target),
                wall,
                {"device_s": t_device, "cloud_s": t_cloud},
            )
        return rows
