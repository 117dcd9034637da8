"""Settings of the offline continual-adaptation experiment (quick and full sizes)."""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import Field, ValidationError

from cloud.akd import AKDConfig
from common.config import StrictConfig, short_validation_message
from common.errors import ConfigError
from sim.world import parse_domain


class ExperimentConfig(StrictConfig):
    """One offline run: the drifting stream, the per-round budgets, and the learning settings."""

    recipe: Literal["base", "micro", "micro-random"] = "base"
    # A built zoo directory (with teacher/ and device/) to use instead of the recipe's cached zoo.
    zoo_dir: str | None = None
    seed: int = 0
    # The shifts the zoo's device model does not survive (its tower saw them only mildly), in stream order.
    shifts: list[str] = ["night", "cast", "background"]
    rounds_per_shift: int = Field(3, ge=1)
    stream_per_round: int = Field(768, ge=4)
    # Held-out samples per domain: at 1,000 one standard error is at most 1.6 points (400 gave 2.5 and one
    # unlucky set read the teacher 6 points above its usual background accuracy).
    eval_size: int = Field(1000, ge=4)
    calibration_size: int = Field(256, ge=4)
    # UTS: samples per round the uplink may carry, and the share of visual tokens kept per sample. Fewer uploads
    # with more tokens each for the same bytes (160 at 0.75 rather than 240 at 0.5) gave the teacher better labels
    # and cast a larger recovery (docs/learning-core.md, the levers).
    uplink_samples_per_round: int = Field(160, ge=1)
    keep_ratio: float = Field(0.75, gt=0, le=1)
    uncertainty_score: Literal["confidence", "entropy", "energy", "combined"] = "confidence"
    relevance_weight: float = Field(0.5, ge=0, le=1)
    # AKD on the new uploads and a replay buffer of as many uploads as ``replay_rounds`` rounds carry.
    replay_rounds: int = Field(3, ge=1)
    # The cloud's validation gate (as the service runs it): every n-th upload is held out, and a candidate whose
    # agreement with the teacher on them falls by more than the margin is not published.
    held_out_every: int = Field(5, ge=2)
    gate_margin: float = Field(0.02, ge=0, le=1)
    akd: AKDConfig = AKDConfig(epochs=3, batch_size=32, lr=3e-3)
    # DWC: downlink byte budget per round as a fraction of the fp32 adapter.
    downlink_fraction: float = Field(0.05, gt=0, le=1)
    dwc_bits: Literal[2, 4, 8, "auto"] = "auto"
    dwc_energy_share: float = Field(0.98, gt=0, le=1)
    dwc_selection: Literal["energy", "impact"] = "energy"
    # ceiling: Tandem's uploads (same seqs, same tokens) labelled with the world's answers, same recipe and budgets.
    baselines: list[Literal["send_all", "fp32", "ce_only", "ceiling"]] = ["ceiling", "send_all", "fp32", "ce_only"]
    # Rate-recovery arms (sim/experiment/rate_arms.py): jpeg50, jpeg90, all_int8 and /2 rates such as r8b4.
    rate_arms: list[str] = []
    threads: int = Field(1, ge=1)

    def check(self) -> ExperimentConfig:
        """Validate the domain names (ConfigError naming the bad one)."""
        if not self.shifts:
            raise ConfigError("the stream needs at least one shift")
        for s in self.shifts:
            parse_domain(s)
        from sim.experiment.rate_arms import check_rate_arms

        check_rate_arms(self.rate_arms)
        return self


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings (YAML values; ``akd.x`` keys merge into the AKD settings) as ``sized`` overrides."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"setting {item!r} is not KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"setting {key!r}: value {raw!r} is not YAML ({exc.__class__.__name__})") from None
        head, _, rest = key.partition(".")
        if rest:
            if head != "akd":
                raise ConfigError(f"setting {key!r}: only akd.* settings are nested")
            out.setdefault("akd_overrides", {})[rest] = value
        else:
            out[key] = value
    return out


def sized(size: str, recipe: str | None = None, **overrides) -> ExperimentConfig:
    """The ``quick`` or ``full`` experiment (``tiny`` is for tests), with overrides applied."""
    presets: dict[str, dict] = {
        "full": {},
        "quick": {
            "shifts": ["night", "cast"],
            "rounds_per_shift": 3,
            "stream_per_round": 384,
            "eval_size": 200,
            "calibration_size": 128,
            "uplink_samples_per_round": 80,
        },
        # The rate-recovery benchmark (docs/learning-core.md): quick's shifts, two rounds each, every rate arm.
        "rates": {
            "shifts": ["night", "cast"],
            "rounds_per_shift": 2,
            "stream_per_round": 256,
            "eval_size": 200,
            "calibration_size": 128,
            "uplink_samples_per_round": 80,
            "rate_arms": ["jpeg50", "jpeg90", "all_int8", "r32b4", "r32b3", "r16b4", "r8b4"],
            "baselines": [],
        },
        "tiny": {
            "recipe": "micro-random",
            "shifts": ["night"],
            "rounds_per_shift": 2,
            "stream_per_round": 16,
            "eval_size": 12,
            "calibration_size": 8,
            "uplink_samples_per_round": 6,
            "akd": AKDConfig(epochs=1, batch_size=8),
            "downlink_fraction": 0.2,
        },
    }
    if size not in presets:
        raise ConfigError(f"unknown experiment size {size!r}; known: {', '.join(presets)}")
    data = dict(presets[size])
    if recipe is not None:
        data["recipe"] = recipe
    akd_overrides = overrides.pop("akd_overrides", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        if akd_overrides:
            akd = data.get("akd", ExperimentConfig.model_fields["akd"].default)
            data["akd"] = {**akd.model_dump(), **akd_overrides}
        return ExperimentConfig(**data).check()
    except ValidationError as exc:
        raise ConfigError(f"invalid experiment settings: {short_validation_message(exc)}") from None
