"""Rate-recovery arms: what each way of sending UTS's chosen samples costs on the link and recovers.

Every arm runs UTS stage 1 (the same gate and budget) and the same cloud learner; they differ in what a chosen
sample puts on the link:

- ``jpeg50`` / ``jpeg90``: the frame as a JPEG (a baseline that sends pixels); the cloud decodes it and runs the
  device's vision tower itself, so it trains on every token of the decoded picture;
- ``all_int8``: every visual token, format /1 (int8, one scale per token);
- ``uts_int8`` is the main ``tandem`` arm (UTS tokens, format /1), not repeated here;
- ``r<k>b<b>``: UTS tokens in format /2 on the device model's basis at that rate.

Bytes on the link per sample are the payload in one ``SampleChunk`` message (seq, offset, payload description
with digest and tensor list, the bytes), which is what the gateway receives per sample below the chunk size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from common.feature_basis import KNOWN_BASES, FeatureBasis, fit_basis, load_basis
from common.feature_codec import parse_rate
from common.llava_tokens import vision_features
from common.sample_codec import UploadSample, encode_sample
from device.uts import UncertaintyTokenSampler
from device.uts.rate import RateConfig
from protocol.payload import describe_payload
from protocol.tandem.v1 import gateway_pb2
from sim.experiment.arms import AdaptingArm
from sim.experiment.data import FeatureSet
from sim.experiment.micro import ModelPair, pixel_batch

JPEG_ARMS = {"jpeg50": 50, "jpeg90": 90}
DEFAULT_RATE_ARMS = ["jpeg50", "jpeg90", "all_int8", "r32b4", "r32b3", "r16b4", "r8b4"]


def link_bytes(payload: bytes) -> int:
    """Bytes of the one ``SampleChunk`` message that carries ``payload`` (metadata map left empty)."""
    chunk = gateway_pb2.SampleChunk(
        seq=2**40, offset=0, data=payload, payload=describe_payload(payload), created_unix_ms=2**41
    )
    return chunk.ByteSize()


def jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class CountingArm(AdaptingArm):
    """An adapting arm that also counts payload and link bytes of what it sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.payload_bytes = 0
        self.link_bytes = 0
        self.samples = 0

    def _count(self, sent: list[bytes]) -> None:
        self.payload_bytes += sum(len(p) for p in sent)
        self.link_bytes += sum(link_bytes(p) for p in sent)
        self.samples += len(sent)

    def _payloads(self, stream: FeatureSet, batch: int = 64) -> tuple[list[bytes], list[int]]:
        payloads, picked = super()._payloads(stream, batch)
        self._count(payloads)
        return payloads, picked


class JpegArm(CountingArm):
    """UTS picks the samples; each goes up as a JPEG, and the cloud runs the tower on the decoded frame."""

    def __init__(self, *args, pair: ModelPair, quality: int, **kwargs) -> None:
        super().__init__(*args, pair=pair, **kwargs)
        self.pair = pair
        self.quality = quality

    @torch.no_grad()
    def _payloads(self, stream: FeatureSet, batch: int = 64) -> tuple[list[bytes], list[int]]:
        _, picked = AdaptingArm._payloads(self, stream, batch)
        from PIL import Image

        frames = [jpeg(stream.images[i], self.quality) for i in picked]
        self._count(frames)
        decoded = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames]
        payloads = []
        for i in range(0, len(picked), batch):
            feats = vision_features(self.pair.device, pixel_batch(self.pair.processor, decoded[i : i + batch]))
            for j, f in enumerate(feats):
                pos = picked[i + j]
                probe = torch.zeros(1, dtype=torch.long)
                sample = UploadSample(f, torch.arange(f.shape[0]), f.shape[0], stream.questions[pos], probe,
                                      torch.zeros(1))  # fmt: skip
                payloads.append(encode_sample(sample))  # the cloud's own copy of the tower's output
        return payloads, picked


def check_rate_arms(names: list[str]) -> None:
    """ConfigError naming an arm that is neither a baseline nor a rate."""
    from common.errors import ConfigError

    for name in names:
        if name in JPEG_ARMS or name == "all_int8":
            continue
        try:
            parse_rate(name)
        except ValueError as exc:
            raise ConfigError(f"unknown rate arm {name!r} (jpeg50, jpeg90, all_int8 or a rate): {exc}") from None


def device_basis(pair_dir: Path | None, calibration: torch.Tensor) -> FeatureBasis:
    """The basis shipped with the device model (its directory), else one fitted on the source calibration set."""
    basis = load_basis(pair_dir) if pair_dir is not None else None
    if basis is None or basis.dim != calibration.shape[-1]:
        basis = fit_basis(calibration)
    KNOWN_BASES.add(basis)  # the cloud side of the experiment knows it, as a cloud shipped with the model does
    return basis


def build_rate_arms(names: list[str], make_uts, basis: FeatureBasis, pair: ModelPair, arm_args: dict) -> list:
    """One arm per name (``jpeg50``, ``jpeg90``, ``all_int8``, ``r<k>b<b>``), sharing UTS's settings."""
    arms: list[AdaptingArm] = []
    for name in names:
        uts: UncertaintyTokenSampler = make_uts()
        if name in JPEG_ARMS:
            arms.append(JpegArm(name, uts=uts, pair=pair, quality=JPEG_ARMS[name], **arm_args))
            continue
        if name == "all_int8":
            uts.config = uts.config.model_copy(update={"keep_ratio": 1.0})
        else:
            parse_rate(name)
            uts.config = uts.config.model_copy(update={"rate": RateConfig(rate=name)})
            uts.rates.config = uts.config.rate
            uts.set_basis(basis)
        arms.append(CountingArm(name, uts=uts, pair=pair, **arm_args))
    return arms


def rate_facts(arms: list) -> dict:
    """Payload and link bytes per sample of every counting arm."""
    return {
        a.name: {
            "samples": a.samples,
            "payload_bytes_per_sample": a.payload_bytes / max(1, a.samples),
            "link_bytes_per_sample": a.link_bytes / max(1, a.samples),
        }
        for a in arms
        if isinstance(a, CountingArm)
    }
