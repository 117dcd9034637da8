"""The cloud's bases: loaded from the families' device models and kept refits; the trainer decodes /2 on them."""

from __future__ import annotations

import torch

from cloud.adaptation.config import AdaptationConfig, ModelFamily
from cloud.adaptation.uploads import decode_uploads
from cloud.feature_bases import accepted_formats, keep_refit, load_known_bases
from common.feature_basis import BasisBook, fit_basis, load_basis
from common.feature_codec import FORMAT_V2, Rate
from common.sample_codec import SampleCoding, UploadSample, encode_sample
from sim.zoo.reference import reference_root

DEVICE = reference_root("base") / "device"


def _payload(basis) -> bytes:
    s = UploadSample(torch.randn(10, 64), torch.arange(10), 144, "q ?", torch.tensor([1]), torch.tensor([0.9]))
    return encode_sample(s, SampleCoding(basis, Rate(8, 4)))


def test_families_and_refits_are_known_and_decoded(tmp_path):
    shipped = load_basis(DEVICE)
    refit = fit_basis(torch.randn(400, 64), parent=shipped.version)
    keep_refit(refit, tmp_path, BasisBook())
    cfg = AdaptationConfig(
        families={"tandem-zoo": ModelFamily(device_model=str(DEVICE), teacher_model=str(DEVICE))}, state_dir=tmp_path
    )
    book = BasisBook()
    assert accepted_formats(book) == ["tandem.uts.sample/1"]  # nothing known: /1 only
    assert load_known_bases(cfg, book) == sorted([shipped.version, refit.version])
    assert FORMAT_V2 in accepted_formats(book)
    load_known_bases(cfg)  # the process's book, which the trainer's decode reads
    stranger = fit_basis(torch.randn(400, 64))
    rows = [("d", 1, _payload(shipped), {}), ("d", 2, _payload(refit), {}), ("d", 3, _payload(stranger), {})]
    out = decode_uploads(rows, "tandem-zoo", 64)
    assert [u.seq for u in out.uploads] == [1, 2]
    assert out.skipped[0]["seq"] == 3 and "does not know" in out.skipped[0]["reason"]


def test_a_family_without_a_basis_leaves_the_cloud_on_format_1(tmp_path):
    cfg = AdaptationConfig(families={"f": ModelFamily(device_model=str(tmp_path), teacher_model=str(tmp_path))})
    book = BasisBook()
    assert load_known_bases(cfg, book) == [] and accepted_formats(book) == ["tandem.uts.sample/1"]
