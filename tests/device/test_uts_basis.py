"""The device's basis: format fallback for a cloud without /2, and basis updates signed and verified like adapters."""

from __future__ import annotations

import json

import pytest
import torch
from transport_support import registered_client, running_gateway

from cloud.feature_bases import keep_refit, refit
from common.feature_basis import BasisBook, basis_update_header, fit_basis, load_basis
from common.feature_codec import FORMAT_V2
from common.sample_codec import FORMAT, UploadSample
from common.signing import generate_private_key
from common.update_header import UpdateError
from device.transport.identity import DeviceIdentity
from device.uts.basis import CloudAccepts, apply_basis_update, held_basis, negotiated
from sim.zoo.reference import reference_root

GEN = torch.Generator().manual_seed(5)
OLD = fit_basis(torch.randn(300, 16, generator=GEN))
NEW = fit_basis(torch.randn(300, 16, generator=GEN) * 2 + 1, parent=OLD.version)


def test_format_2_only_on_a_cloud_that_decodes_it_on_our_basis():
    assert negotiated(OLD, CloudAccepts((FORMAT, FORMAT_V2), (OLD.version,))) is OLD
    assert negotiated(OLD, CloudAccepts()) is None  # a cloud older than /2 says nothing: format /1
    assert negotiated(OLD, CloudAccepts((FORMAT, FORMAT_V2), (NEW.version,))) is None  # another basis
    assert negotiated(OLD, CloudAccepts((FORMAT,), (OLD.version,))) is None
    assert negotiated(None, CloudAccepts((FORMAT, FORMAT_V2), (OLD.version,))) is None


def test_an_identity_saved_before_v2_loads_and_falls_back(tmp_path):
    doc = {"device_id": "d", "token": "t", "cohort": "", "gateway": "g", "cloud_public_key_pem": "",
           "chunk_size": 1, "max_sample_bytes": 1}  # fmt: skip
    (tmp_path / "identity.json").write_text(json.dumps(doc))
    ident = DeviceIdentity.load(tmp_path)
    assert (
        ident.sample_formats == () and negotiated(OLD, CloudAccepts(ident.sample_formats, ident.feature_bases)) is None
    )


async def test_registering_with_a_v2_cloud_enables_the_shipped_basis(tmp_path):
    shipped = held_basis(reference_root("base") / "device", tmp_path / "state")
    assert shipped is not None
    async with running_gateway(tmp_path / "cloud") as gw, registered_client(tmp_path / "dev", gw.address) as client:
        saved = DeviceIdentity.load(tmp_path / "dev")
        assert saved.sample_formats == client.identity.sample_formats
        assert negotiated(shipped, CloudAccepts(saved.sample_formats, saved.feature_bases)) is shipped


def test_the_cloud_refits_on_received_tokens_and_names_the_parent():
    received = [UploadSample(torch.randn(40, 16, generator=GEN) * 3, torch.arange(40), 40, "q", torch.tensor([1]),
                             torch.tensor([1.0])) for _ in range(8)]  # fmt: skip
    new = refit(received, OLD)
    assert new.parent == OLD.version and new.version != OLD.version and new.rank == OLD.rank
    with pytest.raises(ValueError, match="at least 256 tokens"):
        refit(received[:1], OLD)


def test_a_signed_basis_update_installs_and_anything_off_changes_nothing(tmp_path):
    key = generate_private_key()
    cloud_book = BasisBook()
    keep_refit(NEW, tmp_path / "cloud", cloud_book)  # the cloud knows the refit before any device uses it
    assert cloud_book.get(NEW.version) is not None
    payload = NEW.to_bytes()
    header = basis_update_header(NEW, payload, OLD.version)
    signature, _ = header.sign(key)
    pub = key.public_key()
    state = tmp_path / "device"
    with pytest.raises(UpdateError, match="signature"):
        apply_basis_update(state, header, payload, signature, generate_private_key().public_key(), OLD)
    with pytest.raises(UpdateError, match="holds"):
        apply_basis_update(state, header, payload, signature, pub, NEW)
    with pytest.raises(UpdateError, match="size and digest"):
        apply_basis_update(state, header, payload[:-1] + b"\0", signature, pub, OLD)
    assert load_basis(state) is None
    installed = apply_basis_update(state, header, payload, signature, pub, OLD)
    assert installed.version == NEW.version and installed.parent == OLD.version
    assert held_basis(reference_root("base") / "device", state).version == NEW.version  # survives a restart
