"""The reference zoo that ships with the project, and bit-for-bit comparison of a zoo against it.

A built zoo's weights depend on the machine and the library versions that trained it (the same recipe gave a
device whose night accuracy differed by 20 points on another machine), so the figures in the README and docs/
rest on one build that ships in ``sim/zoo/reference/<recipe name>/``: every machine evaluates the same weights.
``tandem-sim zoo build`` still trains from the recipe and says whether its result equals the shipped one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
EVAL_FILE = "eval.json"  # the shipped zoo's measured evaluation (the README's tables)
MEMBERS = ("teacher", "device")


def reference_root(name: str) -> Path:
    """Where the shipped zoo of recipe ``name`` lives (whether or not it exists)."""
    return REFERENCE_DIR / name


@dataclass(frozen=True)
class MemberComparison:
    """How one member's weights compare: tensors that are bit-identical, and the largest absolute difference."""

    member: str
    tensors: int
    identical: int
    max_abs_diff: float
    missing: tuple[str, ...] = ()

    @property
    def equal(self) -> bool:
        return self.identical == self.tensors and not self.missing


def _weights(model_dir: Path) -> dict:
    tensors: dict = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (so -0.0 differs from 0.0 and NaN payloads count)."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def compare_member(member: str, built: Path, shipped: Path) -> MemberComparison:
    """Compare two model directories tensor by tensor (dtype, shape and every bit)."""
    a, b = _weights(built), _weights(shipped)
    missing = tuple(sorted(set(a) ^ set(b)))
    identical, worst = 0, 0.0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype == y.dtype and x.shape == y.shape and _bits(x).equal(_bits(y)):
            identical += 1
            continue
        gap = float((x.double() - y.double()).abs().max()) if x.shape == y.shape else float("inf")
        worst = max(worst, gap)
    return MemberComparison(member, len(set(a) & set(b)), identical, worst, missing)


def compare_zoos(built_root: Path, shipped_root: Path) -> list[MemberComparison]:
    """Compare every member the two zoos hold."""
    return [
        compare_member(m, built_root / m, shipped_root / m)
        for m in MEMBERS
        if (built_root / m).is_dir() and (shipped_root / m).is_dir()
    ]


def shipped_evaluation(name: str) -> dict | None:
    """The evaluation measured on the shipped zoo (``eval.json``), or None."""
    path = reference_root(name) / EVAL_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ship(built_root: Path, name: str) -> Path:
    """Copy a built zoo (manifest, members; safetensors, configs, tokenizer) into the reference directory."""
    target = reference_root(name)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(built_root, staging, ignore=shutil.ignore_patterns("*.lock", "__pycache__"))
    evaluation = target / EVAL_FILE
    if evaluation.is_file():  # keep the measured figures until they are measured again
        shutil.copy2(evaluation, staging / EVAL_FILE)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
