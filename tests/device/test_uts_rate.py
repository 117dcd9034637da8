"""UTS picks the /2 rate within its byte budget: a tight budget gets more samples at a lower rate."""

from __future__ import annotations

import torch

from common.feature_basis import BasisBook, fit_basis
from common.sample_codec import decode_sample
from device.uts import GateConfig, UncertaintyTokenSampler, UTSConfig
from device.uts.rate import RateConfig

GEN = torch.Generator().manual_seed(3)
FEATURES = torch.randn(64, 16, 32, generator=GEN)
BASIS = fit_basis(FEATURES)
BOOK = BasisBook()
BOOK.add(BASIS)


def _send(budget: float, ladder: list[str], basis=BASIS, codec="auto") -> tuple[int, int, list[bytes]]:
    gate = GateConfig(unit="bytes", budget=budget, expected_arrivals=64)
    rate = RateConfig(ladder=ladder, min_samples_per_period=32, codec=codec)
    uts = UncertaintyTokenSampler(UTSConfig(gate=gate, keep_ratio=0.5, rate=rate), basis=basis)
    logits = torch.zeros(64, 10)  # every sample maximally unsure: only the budget limits uploads
    results = uts.decide(FEATURES, ["q"] * 64, logits, [torch.rand(16, generator=GEN) for _ in range(64)])
    payloads = [r.payload for r in results if r.sent]
    return len(payloads), sum(len(p) for p in payloads), payloads


def test_a_tight_byte_budget_lowers_the_rate_and_keeps_the_sample_count():
    fixed_n, fixed_bytes, _ = _send(4000, ["r16b8"])
    ladder_n, ladder_bytes, payloads = _send(4000, ["r16b8", "r8b4", "r2b2"])
    assert fixed_bytes <= 4000 and ladder_bytes <= 4000
    assert ladder_n > 1.5 * fixed_n, (ladder_n, fixed_n)
    ranks = {decode_sample(p, BOOK).features.shape for p in payloads}
    assert ranks == {(8, 32)}
    roomy_n, _, roomy = _send(10**6, ["r16b8", "r8b4", "r2b2"])
    assert roomy_n == 64 and len(roomy[0]) == max(len(p) for p in payloads + roomy)  # room: the highest rate


def test_without_a_basis_or_with_codec_int8_uts_sends_format_1():
    for basis, codec in ((None, "auto"), (BASIS, "int8")):
        _, _, payloads = _send(10**6, ["r8b4"], basis=basis, codec=codec)
        assert payloads[0][:4] != b"TUS2" and decode_sample(payloads[0]).features.shape == (8, 32)


def test_the_device_outbox_accepts_what_uts_encodes_on_its_basis(tmp_path):
    from device.transport.outbox import Outbox

    own = fit_basis(torch.randn(300, 32, generator=GEN))  # a basis no other code of this process has seen
    uts = UncertaintyTokenSampler(UTSConfig(gate=GateConfig(budget=64)), basis=own)
    results = uts.decide(FEATURES[:4], ["q"] * 4, torch.zeros(4, 10), [torch.rand(16, generator=GEN)] * 4)
    payload = next(r.payload for r in results if r.sent)
    assert payload[:4] == b"TUS2" and Outbox(tmp_path / "outbox.db").put(payload) == 1
