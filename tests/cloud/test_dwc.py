"""DWC: exact round trip against the cloud mirror, error feedback, budgets, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cloud.dwc import CloudMirror, DWCConfig, compress, full_state_bytes
from common.delta_codec import UpdateError, header_from_json, header_to_json, state_digest
from device.update_apply import VersionedAdapter, apply_adapter_update


def _lora_like_state(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(3):
        for mod, (out_f, in_f) in {"q_proj": (64, 64), "up_proj": (128, 64), "down_proj": (64, 128)}.items():
            prefix = f"base_model.model.layers.{layer}.{mod}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    return state


def _step(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.mark.parametrize("bits", [2, 4, 8, "auto"])
def test_round_trip_is_bit_exact_against_mirror(bits):
    base = _lora_like_state(0)
    mirror = CloudMirror(base)
    device = VersionedAdapter(0, {k: v.clone() for k, v in base.items()})
    target = base
    for r in range(1, 4):
        target = _step(target, r)
        update = compress(mirror, target, DWCConfig(bits=bits, energy_share=0.7, budget_bytes=3000))
        device = apply_adapter_update(device, update.payload, update.header)
        mirror.commit(update)
        assert device.version == mirror.version == r
        for k in base:
            assert torch.equal(device.state[k], mirror.state[k])
        assert device.digest() == state_digest(mirror.state)
        assert len(update.payload) <= 3000
        assert 0 < update.header.units_sent < update.header.units_total


def test_error_feedback_sends_the_whole_delta():
    base = _lora_like_state(1)
    target = _step(base, 7, scale=0.05)
    mirror = CloudMirror(base)
    first = compress(mirror, target, DWCConfig(bits=4, energy_share=0.5, budget_bytes=2000))
    assert first.sent_share < 0.9  # one round cannot carry it
    mirror.commit(first)
    residual_energy = [first.residual_energy]
    for _ in range(40):
        update = compress(mirror, target, DWCConfig(bits=4, energy_share=0.5, budget_bytes=2000))
        mirror.commit(update)
        residual_energy.append(update.residual_energy)
    assert residual_energy[-1] < 1e-9 * first.delta_energy
    worst = max(float((target[k] - mirror.state[k]).abs().max()) for k in base)
    assert worst < 1e-6
    assert all(b <= a * 1.0000001 for a, b in zip(residual_energy, residual_energy[1:], strict=False))


def test_budget_and_compression_ratio():
    base = _lora_like_state(2)
    target = _step(base, 3)
    fp32 = full_state_bytes(target)
    update = compress(CloudMirror(base), target, DWCConfig(bits="auto", budget_bytes=fp32 // 20))
    assert update.header.payload_bytes <= fp32 // 20
    assert update.sent_share > 0.1
    with pytest.raises(UpdateError, match="below the payload overhead"):
        compress(CloudMirror(base), target, DWCConfig(budget_bytes=50))


def test_wrong_base_version_leaves_state_unchanged():
    base = _lora_like_state(3)
    mirror = CloudMirror(base, version=5)
    update = compress(mirror, _step(base, 1), DWCConfig())
    device = VersionedAdapter(4, {k: v.clone() for k, v in base.items()})
    before = device.digest()
    with pytest.raises(UpdateError, match="base version 5, device holds 4"):
        apply_adapter_update(device, update.payload, update.header)
    assert device.digest() == before and device.version == 4


def test_tampered_payload_and_header_are_rejected():
    base = _lora_like_state(4)
    update = compress(CloudMirror(base), _step(base, 1), DWCConfig(bits=8))
    device = VersionedAdapter(0, base)
    tampered = bytearray(update.payload)
    tampered[-3] ^= 0x55
    with pytest.raises(UpdateError, match="digest"):
        apply_adapter_update(device, bytes(tampered), update.header)
    forged = dataclasses.replace(update.header, payload_sha256=__import__("hashlib").sha256(tampered).hexdigest())
    with pytest.raises(UpdateError, match="mirror|malformed|count"):
        apply_adapter_update(device, bytes(tampered), forged)
    with pytest.raises(UpdateError, match="not valid safetensors|truncated|too short"):
        apply_adapter_update(
            device,
            b"\x10\x00",
            dataclasses.replace(update.header, payload_sha256=__import__("hashlib").sha256(b"\x10\x00").hexdigest()),
        )
    assert header_from_json(header_to_json(update.header)) == update.header
    with pytest.raises(UpdateError, match="malformed update header"):
        header_from_json('{"base_version": 1}')


def test_nan_in_delta_is_rejected_and_mirror_kept():
    base = _lora_like_state(5)
    mirror = CloudMirror(base)
    bad = _step(base, 1)
    name = sorted(bad)[2]
    bad[name][0, 0] = float("nan")
    with pytest.raises(UpdateError, match="NaN or inf"):
        compress(mirror, bad, DWCConfig())
    bad[name][0, 0] = float("inf")
    with pytest.raises(UpdateError, match="NaN or inf"):
        compress(mirror, bad, DWCConfig())
    assert state_digest(mirror.state) == state_digest(base) and mirror.version == 0


def test_mismatched_shapes_are_rejected():
    base = _lora_like_state(6, rank=4)
    other = _lora_like_state(6, rank=8)
    with pytest.raises(UpdateError, match="shapes mismatch"):
        compress(CloudMirror(base), other, DWCConfig())
    update = compress(CloudMirror(base), _step(base, 2), DWCConfig())
    device = VersionedAdapter(0, other)
    with pytest.raises(UpdateError, match="different adapter tensors or shapes"):
        apply_adapter_update(device, update.payload, update.header)
    assert state_digest(device.state) == state_digest(other)
