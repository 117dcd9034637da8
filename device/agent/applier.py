"""Turn a verified update payload into the next adapter version (DWC apply), off the request path.

The fetcher has already checked addressing, base version, size, digest and signature. Here the DWC payload is
applied to the exact state the device serves (``common.delta_codec.apply_update``: base check, layout, finite
values, and the result digest the cloud's mirror computed). Any failure raises and leaves the served version as is.
"""

from __future__ import annotations

from common.delta_codec import UpdateError, apply_update
from common.tensor_pack import PayloadError, unpack
from device.agent.store import AdapterState


def payload_target(payload: bytes) -> int:
    """The DWC target version written in the payload's metadata."""
    try:
        _, meta = unpack(payload)
        return int(meta["target_version"])
    except (PayloadError, KeyError, ValueError) as exc:
        raise UpdateError(f"not a DWC payload: {exc}") from None


def apply_dwc(current: AdapterState, payload: bytes, target_version: str) -> AdapterState:
    """The adapter after ``payload``: wire version ``target_version``; UpdateError if anything is off."""
    new_state = apply_update(current.state, payload, current.dwc_version)
    dwc_target = payload_target(payload)
    if dwc_target <= current.dwc_version:
        raise UpdateError(f"update targets DWC version {dwc_target}, device already at {current.dwc_version}")
    return AdapterState(target_version, dwc_target, new_state)
