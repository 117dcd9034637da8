"""Device side of DWC: verify and apply an adapter update, producing bit-exactly the cloud's mirror.

The device keeps its adapter as a versioned state dict (PEFT key names; versions are strings, as in the one
``UpdateHeader``). ``apply_adapter_update`` returns
a new ``VersionedAdapter`` and leaves the current one untouched on any error, so the caller swaps
atomically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.delta_codec import apply_update, check_finite, state_digest
from common.update_header import UpdateError, UpdateHeader


@dataclass(frozen=True)
class VersionedAdapter:
    """The adapter weights a device holds and their version."""

    version: str
    state: dict[str, torch.Tensor]

    def digest(self) -> str:
        """Digest of the exact weights (equal to the cloud mirror's after every update)."""
        return state_digest(self.state)


def apply_adapter_update(current: VersionedAdapter, payload: bytes, header: UpdateHeader) -> VersionedAdapter:
    """Dequantize and add the update on top of ``current``; UpdateError (and no change) if anything is off."""
    if header.target_version == current.version:
        raise UpdateError(f"update targets version {header.target_version!r}, which the device already holds")
    check_finite(current.state, "device adapter state")
    new_state = apply_update(current.state, payload, current.version, header=header)
    return VersionedAdapter(version=header.target_version, state=new_state)


def load_adapter_state(peft_model: torch.nn.Module, adapter: VersionedAdapter, slot: str = "default") -> None:
    """Copy an adapter state into a PeftModel's adapter ``slot`` (keys as ``get_peft_model_state_dict`` names
    them)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, adapter.state, adapter_name=slot)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise UpdateError(f"adapter state has keys the model lacks: {unexpected[:3]}")
