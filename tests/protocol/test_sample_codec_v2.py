"""tandem.uts.sample/2: round trip, sizes, strict decoding, hostile bytes (hypothesis), and the basis it names."""

from __future__ import annotations

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.feature_basis import BasisBook, FeatureBasis, fit_basis, load_basis
from common.feature_codec import MAGIC, Rate, parse_rate
from common.sample_codec import SampleCoding, UploadSample, check_sample, decode_sample, encode_sample
from common.tensor_pack import PayloadError

GEN = torch.Generator().manual_seed(0)
MIX = torch.randn(32, 32, generator=GEN) * torch.logspace(0, -2, 32).unsqueeze(1)
SOURCE = torch.randn(4000, 32, generator=GEN) @ MIX + 0.5
BASIS = fit_basis(SOURCE)
BOOK = BasisBook()
BOOK.add(BASIS)


def _sample(k: int = 12, n: int = 48) -> UploadSample:
    idx = torch.sort(torch.randperm(n, generator=GEN)[:k]).values
    feats = torch.randn(k, 32, generator=GEN) @ MIX + 0.5
    return UploadSample(feats, idx, n, "what color is the cube ?", torch.tensor([3, 9, 1]),
                        torch.tensor([0.6, 0.2, 0.1]), {"confidence": 0.6, "entropy": 0.3})  # fmt: skip


def _body(data: bytes) -> list:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[4:]), raw=False)


def _rebuild(fields: list) -> bytes:
    return MAGIC + zstandard.ZstdCompressor().compress(msgpack.packb(fields, use_bin_type=True))


def test_round_trip_keeps_fields_and_error_falls_with_rate():
    s = _sample()
    errors = []
    for name in ("r2b2", "r8b3", "r16b4", "r32b8"):
        data = encode_sample(s, SampleCoding(BASIS, parse_rate(name)))
        back = decode_sample(data, BOOK)
        check_sample(data, BOOK)
        assert back.patch_indices.tolist() == s.patch_indices.tolist() and back.num_patches == s.num_patches
        assert back.question == s.question and back.answer_ids.tolist() == [3, 9, 1]
        assert torch.allclose(back.answer_probs, s.answer_probs, atol=1e-3)
        assert back.uncertainty == pytest.approx(s.uncertainty, abs=1e-6)
        errors.append(float((back.features - s.features).norm() / (s.features - BASIS.mean).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01, errors


def test_v2_is_much_smaller_than_v1_and_v1_still_decodes():
    s = _sample(24, 48)
    v1, v2 = encode_sample(s), encode_sample(s, SampleCoding(BASIS, Rate(8, 4)))
    assert len(v2) * 4 < len(v1)
    assert decode_sample(v1).features.shape == (24, 32)


def test_sparse_positions_use_gaps_and_decode():
    s = UploadSample(torch.randn(3, 32, generator=GEN), torch.tensor([5, 9000, 70000]), 100000, "q",
                     torch.tensor([1]), torch.tensor([0.5]))  # fmt: skip
    data = encode_sample(s, SampleCoding(BASIS, Rate(4, 4)))
    assert _body(data)[4] == 1 and len(data) < 200
    assert decode_sample(data, BOOK).patch_indices.tolist() == [5, 9000, 70000]


def test_unknown_basis_and_mismatched_width_are_refused():
    data = encode_sample(_sample(), SampleCoding(BASIS, Rate(8, 4)))
    with pytest.raises(PayloadError, match="does not know"):
        decode_sample(data, BasisBook())
    with pytest.raises(PayloadError, match="wide"):
        encode_sample(UploadSample(torch.ones(1, 8), torch.tensor([0]), 1, "q", torch.tensor([1]), torch.tensor([1.0])),
                      SampleCoding(BASIS, Rate(4, 4)))  # fmt: skip


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (1, 0, "num_patches"),
        (1, 2**40, "num_patches"),
        (2, 99, "rank"),
        (3, 9, "bits"),
        (4, 7, "position mode"),
        (5, b"\x00", "bitmap"),
        (6, b"\x01", "component scales"),
        (7, b"\x00", "codes"),
        (8, b"\x01\x00", "answer"),
        (10, {"confidence": float("nan")}, "finite"),
        (10, {"x": "text"}, "numbers"),
        (11, "", "question"),
        (11, 7, "string"),
        (0, 12, "basis"),
    ],
)
def test_each_field_is_checked(index, value, message):
    fields = _body(encode_sample(_sample(), SampleCoding(BASIS, Rate(4, 3))))
    fields[index] = value
    with pytest.raises(PayloadError, match=message):
        check_sample(_rebuild(fields), BOOK)


def test_codes_beyond_their_bits_and_bitmap_padding_are_refused():
    fields = _body(encode_sample(_sample(k=3, n=12), SampleCoding(BASIS, Rate(2, 2))))
    fields[7] = bytes([5]) * len(fields[7])
    with pytest.raises(PayloadError, match="exceed 2 bits"):
        check_sample(_rebuild(fields), BOOK)
    fields = _body(encode_sample(_sample(k=3, n=12), SampleCoding(BASIS, Rate(2, 2))))
    fields[5] = bytes([fields[5][0], fields[5][1] | 0x80])
    with pytest.raises(PayloadError, match="beyond num_patches"):
        check_sample(_rebuild(fields), BOOK)


def test_an_inflating_body_is_bounded():
    bomb = MAGIC + zstandard.ZstdCompressor().compress(b"\x00" * (65 * 1024 * 1024))
    with pytest.raises(PayloadError, match="inflates beyond"):
        check_sample(bomb, BOOK)
    many = _body(encode_sample(_sample(), SampleCoding(BASIS, Rate(1, 2))))
    many[1] = 2**20
    many[5] = b"\xff" * (2**20 // 8)
    many[6] = b"\x00"
    many[7] = b"\x00" * 2**20
    with pytest.raises(PayloadError, match="exceed"):
        check_sample(_rebuild(many), BOOK)


VALID = encode_sample(_sample(), SampleCoding(BASIS, Rate(8, 4)))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        st.binary(max_size=300).map(lambda b: MAGIC + b),
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(
            lambda p: VALID[: p[0]] + bytes([p[1]]) + VALID[p[0] + 1 :]
        ),
        st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n]),
        st.lists(
            st.one_of(
                st.integers(-(2**40), 2**40),
                st.binary(max_size=64),
                st.text(max_size=8),
                st.floats(),
                st.none(),
                st.dictionaries(st.text(max_size=4), st.floats(), max_size=3),
            ),
            min_size=10,
            max_size=13,
        ).map(_rebuild),  # fmt: skip
    )
)
def test_hostile_bytes_give_payload_errors_only(data):
    try:
        sample = decode_sample(data, BOOK)
    except PayloadError:
        return
    assert torch.isfinite(sample.features).all() and sample.features.shape[1] == BASIS.dim


def test_basis_bytes_are_checked_and_versioned():
    again = FeatureBasis.from_bytes(BASIS.to_bytes())
    assert again.version == BASIS.version == fit_basis(SOURCE).version  # deterministic
    tampered = FeatureBasis(BASIS.mean + 1, BASIS.components, BASIS.stds)
    raw = bytearray(tampered.to_bytes())
    raw[raw.index(tampered.version.encode()) : raw.index(tampered.version.encode()) + 12] = BASIS.version.encode()
    with pytest.raises(PayloadError, match="does not match its version"):
        FeatureBasis.from_bytes(bytes(raw))


def test_the_reference_zoo_device_ships_a_basis():
    from sim.zoo.reference import reference_root

    basis = load_basis(reference_root("base") / "device")
    assert basis is not None and basis.dim == 64 and basis.rank == 64


def test_many_threads_encode_at_once():
    """Agents of a simulated fleet encode from their own batcher threads: one shared zstd compressor failed
    ("cannot compress: Src size is incorrect") as soon as two used it at once."""
    from concurrent.futures import ThreadPoolExecutor

    samples = [_sample(24, 48) for _ in range(8)]
    coding = SampleCoding(BASIS, parse_rate("r16b4"))
    expected = [encode_sample(s, coding) for s in samples]

    def work(i: int) -> bool:
        return all(encode_sample(samples[j % 8], coding) == expected[j % 8] for j in range(i, i + 200))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))
