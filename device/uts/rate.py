"""Which format and rate an upload is encoded at: /1 (int8) without a basis, else /2 at a rate from a ladder.

With a byte budget (``gate.unit: bytes``) the chooser keeps the number of samples up and lowers the rate: each
sample gets an allowance of the period's remaining bytes over the samples still wanted
(``min_samples_per_period`` minus those sent), and is encoded at the highest rate of the ladder whose payload
fits it (the lowest when none does). A slow link thus carries more samples at a lower rate rather than fewer
samples. With a sample budget every upload uses ``rate``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.config import StrictConfig
from common.feature_basis import FeatureBasis
from common.feature_codec import parse_rate
from common.sample_codec import SampleCoding, UploadSample, encode_sample
from device.uts.budget import BudgetGate


class RateConfig(StrictConfig):
    """The /2 rates UTS may use (``r<components>b<bits>``)."""

    codec: Literal["auto", "int8"] = "auto"
    """auto: format /2 whenever the cloud decodes it on the device's basis; int8: always format /1."""
    rate: str = "r32b3"
    """The rate with a sample budget (and the bench's default)."""
    ladder: list[str] = ["r32b4", "r32b3", "r16b4", "r8b4"]
    """Rates to choose from with a byte budget, highest first."""
    min_samples_per_period: int = Field(16, ge=1)
    """With a byte budget: how many samples a period should carry; the rate falls until they fit."""

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("the rate ladder needs at least one rate")
        for name in value:
            parse_rate(name)
        return value


class RateChooser:
    """Encodes a sample at the format and rate the basis and the budget allow."""

    def __init__(self, config: RateConfig, basis: FeatureBasis | None = None) -> None:
        self.config = config
        self.basis = basis
        self.last_rate = ""

    def encode(self, sample: UploadSample, gate: BudgetGate) -> bytes:
        """The payload of one sample that the gate is about to judge."""
        if self.basis is None or self.config.codec == "int8":
            self.last_rate = "int8"
            return encode_sample(sample)
        if gate.config.unit == "samples":
            return self._at(sample, self.config.rate)
        wanted = max(1, self.config.min_samples_per_period - gate.accepted)
        allowance = gate.remaining / wanted
        payload = b""
        for name in self.config.ladder:
            payload = self._at(sample, name)
            if len(payload) <= allowance:
                break
        return payload

    def _at(self, sample: UploadSample, name: str) -> bytes:
        assert self.basis is not None
        self.last_rate = name
        return encode_sample(sample, SampleCoding(self.basis, parse_rate(name)))
