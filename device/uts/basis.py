"""Which feature basis the device encodes uploads on, and whether its cloud can decode them (format fallback).

The device starts from the basis shipped with its model directory; a basis update from the cloud (signed like an
adapter update, verified by ``common.feature_basis.verify_basis_update``) replaces it under the state directory.
It sends format /2 only when the cloud announced (Register or Heartbeat) that it accepts /2 and knows that basis
version; otherwise format /1, which every cloud reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.feature_basis import FeatureBasis, load_basis, verify_basis_update
from common.feature_codec import FORMAT_V2
from common.update_header import UpdateHeader


@dataclass(frozen=True)
class CloudAccepts:
    """What the cloud said it decodes (empty lists: a cloud older than format /2)."""

    sample_formats: tuple[str, ...] = ()
    feature_bases: tuple[str, ...] = ()


def held_basis(model_source: str | Path, state_dir: Path) -> FeatureBasis | None:
    """The basis an update installed under ``state_dir``, else the one the model directory ships, else None."""
    held = load_basis(state_dir)
    if held is not None:
        return held
    return load_basis(model_source) if Path(model_source).is_dir() else None


def negotiated(basis: FeatureBasis | None, accepts: CloudAccepts) -> FeatureBasis | None:
    """``basis`` when the cloud decodes format /2 on it, else None (send format /1)."""
    if basis is None or FORMAT_V2 not in accepts.sample_formats or basis.version not in accepts.feature_bases:
        return None
    return basis


def apply_basis_update(
    state_dir: Path, header: UpdateHeader, payload: bytes, signature: bytes, public_key, held: FeatureBasis
) -> FeatureBasis:
    """Verify a basis update against the basis held and install it (atomically); UpdateError changes nothing."""
    basis = verify_basis_update(header, payload, signature, public_key, held.version)
    basis.save(state_dir)
    return basis
