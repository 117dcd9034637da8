"""Turn a verified update payload into the next adapter version (DWC apply), off the request path.

The fetcher has already checked addressing, base version, size, digest and signature. Here the DWC payload is
applied to the exact state the device serves (``device.update_apply``: base version, layout, finite values, and
the result digest the cloud's mirror computed). Any failure raises and leaves the served version as is.
"""

from __future__ import annotations

from device.agent.store import AdapterState
from device.update_apply import VersionedAdapter, apply_adapter_update
from protocol.tandem.v1 import gateway_pb2
from protocol.updates import header_from_proto


def apply_dwc(current: AdapterState, payload: bytes, header: gateway_pb2.UpdateHeader) -> AdapterState:
    """The adapter after ``payload``; UpdateError if anything is off."""
    new = apply_adapter_update(VersionedAdapter(current.version, current.state), payload, header_from_proto(header))
    return AdapterState(new.version, new.state)
