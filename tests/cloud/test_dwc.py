"""DWC: exact round trip against the cloud mirror, error feedback, budgets, bad input."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from cloud.dwc import CloudMirror, DWCConfig, compress, full_state_bytes
from common.delta_codec import state_digest
from common.update_header import UpdateError, header_from_json, header_to_json
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
    device = VersionedAdapter("v0", {k: v.clone() for k, v in base.items()})
    target = base
    for r in range(1, 4):
        target = _step(target, r)
        update = compress(mirror, target, DWCConfig(bits=bits, energy_share=0.7, budget_bytes=3000))
        device = apply_adapter_update(device, update.payload, update.header)
        mirror.commit(update)
        assert device.version == mirror.version == f"v{r}"
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
    assert update.header.size <= fp32 // 20
    assert update.sent_share > 0.1
    with pytest.raises(UpdateError, match="below the payload overhead"):
        compress(CloudMirror(base), target, DWCConfig(budget_bytes=50))


def test_wrong_base_version_leaves_state_unchanged():
    base = _lora_like_state(3)
    mirror = CloudMirror(base, version="v5")
    update = compress(mirror, _step(base, 1), DWCConfig())
    device = VersionedAdapter("v4", {k: v.clone() for k, v in base.items()})
    before = device.digest()
    with pytest.raises(UpdateError, match="base version v5, device holds v4"):
        apply_adapter_update(device, update.payload, update.header)
    assert device.digest() == before and device.version == "v4"


def test_tampered_payload_and_header_are_rejected():
    base = _lora_like_state(4)
    update = compress(CloudMirror(base), _step(base, 1), DWCConfig(bits=8))
    device = VersionedAdapter("v0", base)
    tampered = bytearray(update.payload)
    tampered[-3] ^= 0x55
    with pytest.raises(UpdateError, match="digest"):
        apply_adapter_update(device, bytes(tampered), update.header)
    forged = dataclasses.replace(update.header, sha256_hex=hashlib.sha256(tampered).hexdigest())
    with pytest.raises(UpdateError, match="mirror|malformed|count"):
        apply_adapter_update(device, bytes(tampered), forged)
    with pytest.raises(UpdateError, match="not valid safetensors|truncated|too short"):
        apply_adapter_update(
            device,
            b"\x10\x00",
            dataclasses.replace(update.header, sha256_hex=hashlib.sha256(b"\x10\x00").hexdigest(), size=2),
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
    assert state_digest(mirror.state) == state_digest(base) and mirror.version == "v0"


def test_mismatched_shapes_are_rejected():
    base = _lora_like_state(6, rank=4)
    other = _lora_like_state(6, rank=8)
    with pytest.raises(UpdateError, match="shapes mismatch"):
        compress(CloudMirror(base), other, DWCConfig())
    update = compress(CloudMirror(base), _step(base, 2), DWCConfig())
    device = VersionedAdapter("v0", other)
    with pytest.raises(UpdateError, match="different adapter tensors or shapes"):
        apply_adapter_update(device, update.payload, update.header)
    assert state_digest(device.state) == state_digest(other)


def _layer_weight_error(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    """Squared distance of the LoRA layers' weight changes B @ A between two states."""
    total = 0.0
    for name in state:
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            total += float(((state[b_name] @ state[name] - target[b_name] @ target[name]) ** 2).sum())
    return total


def test_impact_selection_spends_the_budget_on_what_moves_the_layers():
    # Fresh adapters (B = 0) after a round of training: A moved a lot in parameter space, but only B moves the
    # layers' weights while the device's B is still zero.
    base = _lora_like_state(7)
    base = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in base.items()}
    g = torch.Generator().manual_seed(8)
    target = {k: v + (0.3 if ".lora_A." in k else 0.02) * torch.randn(v.shape, generator=g) for k, v in base.items()}
    errors = {}
    for selection in ("energy", "impact"):
        update = compress(CloudMirror(base), target, DWCConfig(bits=8, budget_bytes=4000, selection=selection))
        errors[selection] = _layer_weight_error(update.result_state, target)
    assert errors["impact"] < 0.5 * errors["energy"]


def test_impact_weights_apply_to_lora_pairs_only():
    from cloud.dwc.compressor import unit_weights

    state = {**_lora_like_state(9), "base_model.model.norm.weight": torch.ones(64)}
    weights = unit_weights(state, "impact")
    a_name = "base_model.model.layers.0.q_proj.lora_A.weight"
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    assert torch.allclose(weights[a_name], (state[b_name].double() ** 2).sum(dim=0), rtol=1e-2)
    assert torch.allclose(weights[b_name], (state[a_name].double() ** 2).sum(dim=1), rtol=1e-2)
    assert torch.equal(weights["base_model.model.norm.weight"], torch.ones(1, dtype=torch.float64))
    assert all(torch.equal(w, torch.ones_like(w)) for w in unit_weights(state, "energy").values())


def test_one_header_carries_dwc_facts_signed_and_str_versions():
    from common.signing import generate_private_key
    from common.update_header import next_version
    from protocol.tandem.v1 import tensors_pb2
    from protocol.updates import header_from_proto, header_to_proto

    base = _lora_like_state(10)
    update = compress(CloudMirror(base, version="v7"), _step(base, 1), DWCConfig(bits=4))
    header = update.header.addressed(device_id="dev-1")
    assert (header.base_version, header.target_version) == ("v7", "v8")
    assert header.bits == 4 and header.units_sent > 0 and header.result_sha256
    key = generate_private_key()
    sig, kid = header.sign(key)
    info = tensors_pb2.PayloadInfo(size=header.size, sha256=bytes.fromhex(header.sha256_hex))
    wire = header_to_proto(header, update_id=3, payload=info, signature=sig, key_id=kid, created_unix_ms=1)
    back = header_from_proto(wire)
    assert back == header and back.verify(key.public_key(), sig)
    device = apply_adapter_update(VersionedAdapter("v7", base), update.payload, back)
    assert device.version == "v8" and device.digest() == header.result_sha256
    tampered = dataclasses.replace(back, metadata={**back.metadata, "result_sha256": "0" * 64})
    assert not tampered.verify(key.public_key(), sig)
    with pytest.raises(UpdateError, match="disagrees"):
        apply_adapter_update(VersionedAdapter("v7", base), update.payload, tampered)
    assert next_version("v9") == "v10" and next_version("v2", at_least=5) == "v5" and next_version("41") == "42"
    with pytest.raises(UpdateError, match="counter"):
        next_version("main")
