"""Run the offline experiment: a device pretrained on clear meets a stream that drifts through shifts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cloud.dwc import DWCConfig, full_state_bytes
from device.uts import GateConfig, SourceFeatureStats, UncertaintyTokenSampler, UTSConfig, jpeg_bytes
from sim.experiment.arms import AdaptingArm, CeilingArm, accuracy
from sim.experiment.config import ExperimentConfig
from sim.experiment.data import CALIBRATION_OFFSET, EVAL_OFFSET, feature_set
from sim.experiment.micro import ModelPair, random_pair
from sim.experiment.rate_arms import CountingArm, build_rate_arms, device_basis, rate_facts
from sim.world import World

ARM_LABELS = {
    "none": "no adaptation",
    "teacher": "teacher (upper bound)",
    "tandem": "Tandem (UTS+AKD+DWC)",
    "tandem_fp32": "fp32 adapter downlink",
    "send_all": "send-everything uplink",
    "ce_only": "CE on pseudo-labels only",
    "ceiling": "ceiling (Tandem's uploads, true labels)",
}


@dataclass
class Row:
    """One arm in one round."""

    round: int
    shift: str
    shift_round: int
    arm: str
    accuracy: float
    uplink_bytes: int = 0
    uplink_samples: int = 0
    downlink_bytes: int = 0
    wall_s: float = 0.0
    # The teacher's pseudo-answers to this round's uploads: share right, and (UTS) right with every visual token.
    label_accuracy: float | None = None
    label_accuracy_all_tokens: float | None = None
    cloud_s: float | None = None
    """Seconds the cloud side took this round (labels, training, gate, DWC); not seeded, machine-dependent."""
    outcome: str | None = None
    """The round's job: published, refused (by the gate), unchanged, held out, no uploads."""


@dataclass
class ExperimentResult:
    """Every row plus the byte facts the report quotes."""

    config: dict
    rows: list[Row] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": self.config, "rows": [asdict(r) for r in self.rows], "facts": self.facts}


def load_pair(recipe: str, seed: int, zoo_dir: str | None = None) -> ModelPair:
    """Teacher and device of a zoo recipe (trained and cached by the zoo), of a built zoo directory, or
    random micro models."""
    if recipe == "micro-random" and zoo_dir is None:
        return random_pair(seed=seed)
    from common.llava_tokens import PromptBuilder
    from common.modeling import load_mllm
    from sim.zoo.build import ZooPaths, ensure_zoo
    from sim.zoo.recipe import ZooRecipe, micro_recipe
    from sim.zoo.tokenizer import IMAGE_TOKEN

    if zoo_dir is not None:
        zoo = ZooPaths.at(Path(zoo_dir).expanduser())
    else:
        zoo = ensure_zoo(micro_recipe(seed) if recipe == "micro" else ZooRecipe(seed=seed), progress=False)
    teacher = load_mllm(zoo.teacher).model.eval()
    loaded = load_mllm(zoo.device)
    device, processor = loaded.model.eval(), loaded.processor
    for m in (teacher, device):
        m.requires_grad_(False)
    tok = processor.tokenizer
    return ModelPair(teacher, device, processor, PromptBuilder(tok, tok.convert_tokens_to_ids(IMAGE_TOKEN)))


def device_dir(config: ExperimentConfig) -> Path | None:
    """The device model's directory of a zoo run (None for random micro models)."""
    if config.zoo_dir is not None:
        return Path(config.zoo_dir).expanduser() / "device"
    if config.recipe == "micro-random":
        return None
    from sim.zoo.build import ensure_zoo
    from sim.zoo.recipe import ZooRecipe, micro_recipe

    recipe = micro_recipe(config.seed) if config.recipe == "micro" else ZooRecipe(seed=config.seed)
    return ensure_zoo(recipe, progress=False).device


def run_experiment(
    config: ExperimentConfig, progress: Callable[[str], None] | None = None, pair: ModelPair | None = None
) -> ExperimentResult:
    """Run every arm through every round of the stream; ``progress`` gets one line per round."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, progress, pair)
    finally:
        torch.set_num_threads(previous)


def _run(config: ExperimentConfig, progress: Callable[[str], None] | None, pair: ModelPair | None) -> ExperimentResult:
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    pair = pair or load_pair(config.recipe, config.seed, config.zoo_dir)
    world = World(config.seed, pair.processor.image_processor.crop_size["height"])
    calib = feature_set(pair, world, CALIBRATION_OFFSET, config.calibration_size, "clear")
    stats = SourceFeatureStats(calib.features.shape[-1])
    stats.update(calib.features)

    def make_uts() -> UncertaintyTokenSampler:
        gate = GateConfig(budget=config.uplink_samples_per_round, expected_arrivals=config.stream_per_round)
        cfg = UTSConfig(
            score=config.uncertainty_score,
            gate=gate,
            keep_ratio=config.keep_ratio,
            relevance_weight=config.relevance_weight,
        )
        return UncertaintyTokenSampler(cfg, stats)

    from cloud.adaptation.recipe import JobSettings
    from cloud.adaptation.teacher import Teacher
    from cloud.akd import adapter_state, build_student

    fp32_bytes = full_state_bytes(adapter_state(build_student(pair.device, config.akd.adapter)))
    dwc = DWCConfig(
        bits=config.dwc_bits,
        energy_share=config.dwc_energy_share,
        selection=config.dwc_selection,
        budget_bytes=max(1, int(config.downlink_fraction * fp32_bytes)),
    )
    teacher = Teacher(pair.teacher, pair.prompts)
    replay = (config.replay_rounds - 1) * config.uplink_samples_per_round  # the current round is pooled too
    settings = JobSettings(held_out_every=config.held_out_every, margin=config.gate_margin)
    common = {"replay_samples": replay, "settings": settings}
    kd_free = config.akd.model_copy(update={"w_kd": 0.0, "w_align": 0.0})
    main_arm = CountingArm if config.rate_arms else AdaptingArm
    tandem = main_arm(
        "tandem", teacher, pair, config.akd, make_uts(), dwc, track_fp32="fp32" in config.baselines, **common
    )
    arms = [tandem]
    if "ceiling" in config.baselines:
        arms.append(CeilingArm("ceiling", tandem, teacher, pair, config.akd, None, dwc, **common))
    if "send_all" in config.baselines:
        arms.append(AdaptingArm("send_all", teacher, pair, config.akd, None, dwc, **common))
    if "ce_only" in config.baselines:
        arms.append(AdaptingArm("ce_only", teacher, pair, kd_free, make_uts(), dwc, **common))

    if config.rate_arms:
        basis = device_basis(device_dir(config), calib.features)
        arm_args = {"teacher": teacher, "akd": config.akd, "dwc": dwc, **common}
        arms += build_rate_arms(config.rate_arms, make_uts, basis, pair, arm_args)
    result = ExperimentResult(config=config.model_dump(mode="json"))
    result.facts["fp32_adapter_bytes"] = fp32_bytes
    result.facts["downlink_budget_bytes"] = dwc.budget_bytes
    result.facts["adapter_params"] = sum(v.numel() for v in arms[0].learner.adapters().values())
    clear_eval = feature_set(pair, world, EVAL_OFFSET, config.eval_size, "clear")
    result.facts["clear_accuracy"] = {
        "device": accuracy(pair.device, pair.prompts, clear_eval),
        "teacher": accuracy(pair.teacher, pair.prompts, clear_eval),
    }
    frame, jpeg, sent_bytes, sent_count, all_bytes, all_count = [], [], 0, 0, 0, 0
    stream_start, round_no = 0, 0
    for s_idx, shift in enumerate(config.shifts):
        held_out = feature_set(pair, world, EVAL_OFFSET + (s_idx + 1) * config.eval_size, config.eval_size, shift)
        base_acc = accuracy(pair.device, pair.prompts, held_out)
        teacher_acc = accuracy(pair.teacher, pair.prompts, held_out)
        for r in range(1, config.rounds_per_shift + 1):
            round_no += 1
            stream = feature_set(pair, world, stream_start, config.stream_per_round, shift)
            stream_start += config.stream_per_round
            result.rows.append(Row(round_no, shift, r, "none", base_acc))
            result.rows.append(Row(round_no, shift, r, "teacher", teacher_acc))
            for arm in arms:
                for name, fig in arm.run_round(stream, held_out).items():
                    result.rows.append(
                        Row(
                            round_no,
                            shift,
                            r,
                            name,
                            fig.accuracy,
                            fig.uplink_bytes,
                            fig.uplink_samples,
                            fig.downlink_bytes,
                            fig.wall_s,
                            fig.extra.get("label_accuracy"),
                            fig.extra.get("label_accuracy_all_tokens"),
                            fig.extra.get("cloud_s"),
                            fig.extra.get("outcome"),
                        )
                    )
                    if name == "tandem":
                        picked = fig.extra["picked"]
                        frame += [int(stream.images[i].nbytes) for i in picked]
                        jpeg += [jpeg_bytes(stream.images[i]) for i in picked]
                        sent_bytes += fig.uplink_bytes
                        sent_count += fig.uplink_samples
                    if name == "send_all":
                        all_bytes += fig.uplink_bytes
                        all_count += fig.uplink_samples
            latest = {row.arm: row.accuracy for row in result.rows if row.round == round_no}
            say(f"round {round_no} ({shift} #{r}): " + ", ".join(f"{k} {v:.3f}" for k, v in latest.items()))
    result.facts["uplink_per_sample"] = {
        "tandem_bytes": sent_bytes / max(1, sent_count),
        "send_all_bytes": all_bytes / max(1, all_count) if all_count else None,
        "raw_frame_bytes": float(np.mean(frame)) if frame else None,
        "jpeg_q90_bytes": float(np.mean(jpeg)) if jpeg else None,
    }
    if config.rate_arms:
        result.facts["rate_arms"] = rate_facts(arms)
        result.facts["rate_arms"]["basis"] = basis.version
    result.facts["total_wall_s"] = time.perf_counter() - started
    return result
