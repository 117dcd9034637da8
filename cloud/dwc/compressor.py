"""Build a device's next adapter update from the exact state it holds (the mirror) and the cloud's target.

Error feedback is carried by the mirror: the delta of each round is ``target - mirror``, i.e. the fresh change
plus everything earlier rounds left out or lost to quantization (the residual), so nothing is ever dropped for
good. Selection is dynamic: units (rows/columns, see ``common.delta_codec``) are ranked by the energy of their
delta; the smallest set covering ``energy_share`` of the total is taken, cut to the byte budget. With
``bits="auto"`` 8-, 4- and 2-bit (ternary) codes are built and the one leaving the smaller residual is sent.

With ``selection="impact"`` the energy of a LoRA unit is weighted by what it does to the layer's weight: a
rank component's change in ``lora_B`` (a column) moves the weight by ``dB_i A_i`` and its change in ``lora_A``
(a row) by ``B_i dA_i``, so each unit's energy is scaled by its partner's squared norm (at the target). A change
of ``lora_A`` whose ``lora_B`` is still near zero does almost nothing and waits; parameter-space energy would
spend the budget on it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from common.config import StrictConfig
from common.delta_codec import (
    check_finite,
    encode_update,
    encoded_unit_bytes,
    layout_digest,
    layout_of,
    unit_view,
)
from common.tensor_pack import pack
from common.update_header import INITIAL_VERSION, UpdateError, UpdateHeader, check_version, next_version

# Slack for metadata digits that grow with the selection (versions, counts).
_HEADER_SLACK = 48


class DWCConfig(StrictConfig):
    """Compression settings of one device's downlink."""

    bits: Literal[2, 4, 8, "auto"] = "auto"
    block: int = Field(64, ge=2, multiple_of=2)
    energy_share: float = Field(0.98, gt=0.0, le=1.0)
    budget_bytes: int | None = Field(None, ge=1)
    # How units are ranked: by their delta's energy, or by its first-order effect on the LoRA layer's weight.
    selection: Literal["energy", "impact"] = "energy"


@dataclass
class DWCUpdate:
    """One compressed update and what it achieves."""

    payload: bytes
    header: UpdateHeader
    result_state: dict[str, torch.Tensor]
    delta_energy: float
    residual_energy: float

    @property
    def sent_share(self) -> float:
        """Share of the delta's energy the device receives (1 - residual / delta)."""
        return 1.0 - self.residual_energy / self.delta_energy if self.delta_energy > 0 else 1.0


class CloudMirror:
    """The exact adapter state (and version) one device holds, as the cloud knows it."""

    def __init__(self, state: dict[str, torch.Tensor], version: str = INITIAL_VERSION) -> None:
        check_finite(state, "initial adapter state")
        self.state = {k: v.detach().clone().float().contiguous() for k, v in state.items()}
        self.version = check_version(version)

    def residual(self, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the device still lacks of ``target`` (error feedback: sent in later rounds)."""
        _check_compatible(self.state, target)
        return {k: target[k].float() - self.state[k] for k in self.state}

    def commit(self, update: DWCUpdate) -> None:
        """Advance the mirror once an update is published (it must build on the mirror's version)."""
        if update.header.base_version != self.version:
            raise UpdateError(f"update builds on version {update.header.base_version!r}, mirror is at {self.version!r}")
        self.state = update.result_state
        self.version = update.header.target_version


def _check_compatible(base: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    if set(base) != set(target):
        missing = sorted(set(base) ^ set(target))[:3]
        raise UpdateError(f"adapter tensors differ between mirror and target: {missing}")
    for k in base:
        if tuple(base[k].shape) != tuple(target[k].shape):
            raise UpdateError(f"adapter shapes mismatch for {k!r}: {tuple(base[k].shape)} vs {tuple(target[k].shape)}")


def full_state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the uncompressed fp32 adapter state as safetensors (the no-DWC downlink)."""
    return len(pack({k: v.float() for k, v in state.items()}, {"format": "peft-adapter"}))


_LORA_PARTNER = {"lora_A": "lora_B", "lora_B": "lora_A"}
# Every unit keeps at least this share of its group's mean weight, so error feedback still drains it eventually.
_WEIGHT_FLOOR = 1e-3


def _lora_partner(name: str) -> str | None:
    """The other factor of a peft LoRA pair (``...lora_A.weight`` <-> ``...lora_B.weight``), if named so."""
    for own, other in _LORA_PARTNER.items():
        marker = f".{own}."
        if marker in name:
            return name.replace(marker, f".{other}.")
    return None


def unit_weights(target: dict[str, torch.Tensor], selection: str) -> dict[str, torch.Tensor]:
    """Per-unit weights of the delta energy (see the module doc); 1 for tensors outside a LoRA pair."""
    weights = {}
    for g in layout_of(target):
        partner = _lora_partner(g.name) if selection == "impact" else None
        # lora_A is [r, in], lora_B is [out, r]: component i is A's row i and B's column i. Weigh only when the
        # units are those components (A's rows, B's columns), which holds whenever r is the smaller side.
        is_a = ".lora_A." in g.name
        if partner not in target or target[partner].dim() != 2 or len(g.shape) != 2 or g.transposed == is_a:
            weights[g.name] = torch.ones(g.num_units, dtype=torch.float64)
            continue
        other = target[partner].double()
        norms = (other**2).sum(dim=0) if is_a else (other**2).sum(dim=1)
        weights[g.name] = norms + _WEIGHT_FLOOR * max(float(norms.mean()), 1e-12)
    return weights


def _energy(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], weights=None) -> float:
    """Squared distance of two states, each unit's share scaled by ``weights`` (from ``unit_weights``) if given."""
    if weights is None:
        return float(sum(((state_a[k].double() - state_b[k].double()) ** 2).sum() for k in state_a))
    total = 0.0
    for g in layout_of(state_a):
        d = unit_view((state_a[g.name].double() - state_b[g.name].double()).contiguous(), g)
        total += float(((d**2).sum(dim=1) * weights[g.name]).sum())
    return total


def _ranked_units(mirror: dict[str, torch.Tensor], target: dict[str, torch.Tensor], weights):
    """Units sorted by weighted delta energy: list of (energy, name, unit index, unit_len) plus the total."""
    entries = []
    deltas = {}
    for g in layout_of(mirror):
        d = unit_view((target[g.name].float() - mirror[g.name]).contiguous(), g)
        deltas[g.name] = d
        energy = (d.double() ** 2).sum(dim=1) * weights[g.name]
        for i in torch.nonzero(energy > 0).flatten().tolist():
            entries.append((float(energy[i]), g.name, i, g.unit_len))
    entries.sort(key=lambda e: -e[0])
    return entries, deltas, sum(e[0] for e in entries)


def _select(entries, total: float, share: float, budget: int | None, overhead: int, bits: int, block: int):
    chosen, covered, spent = [], 0.0, overhead
    for energy, name, idx, length in entries:
        if covered >= share * total:
            break
        cost = encoded_unit_bytes(length, bits, block)
        if budget is not None and spent + cost > budget:
            continue  # a shorter unit further down may still fit
        chosen.append((name, idx))
        covered += energy
        spent += cost
    return chosen


def compress(
    mirror: CloudMirror,
    target: dict[str, torch.Tensor],
    config: DWCConfig,
    target_version: str | None = None,
) -> DWCUpdate:
    """Compress ``target - mirror.state`` into a payload; the mirror is not changed (see ``commit``).

    ``target_version`` defaults to the successor of the mirror's counter version (``next_version``).
    """
    _check_compatible(mirror.state, target)
    check_finite(target, "new adapter state")
    version = next_version(mirror.version) if target_version is None else check_version(target_version)
    if version == mirror.version:
        raise UpdateError(f"target version {version!r} must differ from the mirror's")
    weights = unit_weights(target, config.selection)
    entries, deltas, weighted = _ranked_units(mirror.state, target, weights)
    total = _energy(target, mirror.state)
    candidates = (8, 4, 2) if config.bits == "auto" else (config.bits,)
    best: DWCUpdate | None = None
    best_key: tuple[float, int] = (float("inf"), 0)
    for bits in candidates:
        empty, _, _ = encode_update(mirror.state, {}, bits, config.block, mirror.version, version)
        overhead = len(empty) + _HEADER_SLACK
        if config.budget_bytes is not None and overhead > config.budget_bytes:
            raise UpdateError(f"byte budget {config.budget_bytes} is below the payload overhead {overhead}")
        chosen = _select(entries, weighted, config.energy_share, config.budget_bytes, overhead, bits, config.block)
        selected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in {n for n, _ in chosen}:
            idx = torch.tensor(sorted(i for n, i in chosen if n == name), dtype=torch.long)
            selected[name] = (idx, deltas[name][idx])
        payload, header, result = encode_update(mirror.state, selected, bits, config.block, mirror.version, version)
        update = DWCUpdate(payload, header, result, total, _energy(target, result))
        left = _energy(target, result, weights)
        if (left, len(payload)) < best_key:
            best, best_key = update, (left, len(payload))
    assert best is not None
    if layout_digest(best.result_state) != layout_digest(mirror.state):  # pragma: no cover - defensive
        raise UpdateError("internal error: update changed the adapter layout")
    return best
