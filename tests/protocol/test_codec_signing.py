"""Tensor codec (safetensors, no pickle), payload descriptions, chunking, Ed25519 signing, update headers."""

from __future__ import annotations

import pytest
import torch

from common.codec import CodecError, decode_tensors, encode_tensors, iter_chunks, sha256_hex, tensor_infos
from common.signing import (
    SigningError,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    sign,
    verify,
)
from protocol.payload import check_payload, describe_payload
from protocol.updates import UpdateHeader


def test_tensor_round_trip_with_quantization_metadata():
    tensors = {"w": torch.arange(12, dtype=torch.int8).reshape(3, 4), "s": torch.ones(3, dtype=torch.float16)}
    data = encode_tensors(tensors, {"round": "7"}, quantization={"w": {"scheme": "int8", "bits": 8, "scale": "s"}})
    back = decode_tensors(data)
    assert torch.equal(back["w"], tensors["w"]) and back["s"].dtype == torch.float16
    infos = {t.name: t for t in tensor_infos(data)}
    assert infos["w"].dtype == "I8" and infos["w"].shape == (3, 4)
    assert infos["w"].quantization == {"scheme": "int8", "bits": 8, "scale": "s"}
    info = describe_payload(data)
    assert info.format == "safetensors" and info.size == len(data) and info.sha256.hex() == sha256_hex(data)
    w = next(t for t in info.tensors if t.name == "w")
    assert (w.quantization.scheme, w.quantization.bits, dict(w.quantization.params)) == (
        "int8",
        8,
        {"scale": "s"},
    )
    assert check_payload(data, info) is None


def test_pickle_and_garbage_are_not_tensors():
    import pickle

    with pytest.raises(CodecError):
        decode_tensors(pickle.dumps({"w": [1, 2]}))
    assert describe_payload(b"\x00" * 3).format == "opaque"
    with pytest.raises(CodecError, match="quantization given for unknown"):
        encode_tensors({"a": torch.zeros(1)}, quantization={"b": {"scheme": "int8"}})


def test_check_payload_names_the_mismatch():
    data = b"hello world"
    info = describe_payload(data)
    assert "size" in check_payload(data + b"!", info)
    assert "sha256" in check_payload(b"hello worle", info)


def test_iter_chunks_covers_payload_from_offset():
    data = bytes(range(100))
    assert [(o, bytes(v)) for o, v in iter_chunks(data, 40)] == [
        (0, data[:40]),
        (40, data[40:80]),
        (80, data[80:]),
    ]
    assert [o for o, _ in iter_chunks(data, 40, start=50)] == [50, 90]
    assert [(o, bytes(v)) for o, v in iter_chunks(b"", 40)] == [(0, b"")]
    with pytest.raises(ValueError):
        list(iter_chunks(data, 0))


def test_keys_round_trip_and_signatures(tmp_path):
    key = generate_private_key()
    save_private_key(key, tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    loaded = load_private_key(tmp_path / "k.pem")
    pub = load_public_key(tmp_path / "k.pem.pub")
    assert key_id(loaded) == key_id(pub) == key_id(key)
    sig = sign(loaded, b"msg")
    assert verify(pub, b"msg", sig) and not verify(pub, b"msh", sig)
    assert not verify(generate_private_key().public_key(), b"msg", sig)
    with pytest.raises(SigningError, match="not found"):
        load_private_key(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(SigningError):
        load_public_key(tmp_path / "bad.pem")


def test_update_header_signature_covers_every_field():
    key = generate_private_key()
    header = UpdateHeader("dev", "", "v0", "v1", "ab" * 32, 10, {"k": "v"})
    sig, _ = header.sign(key)
    assert header.verify(key.public_key(), sig)
    variants = [
        UpdateHeader("dev2", "", "v0", "v1", "ab" * 32, 10, {"k": "v"}),
        UpdateHeader("dev", "c", "v0", "v1", "ab" * 32, 10, {"k": "v"}),
        UpdateHeader("dev", "", "v9", "v1", "ab" * 32, 10, {"k": "v"}),
        UpdateHeader("dev", "", "v0", "v2", "ab" * 32, 10, {"k": "v"}),
        UpdateHeader("dev", "", "v0", "v1", "ac" * 32, 10, {"k": "v"}),
        UpdateHeader("dev", "", "v0", "v1", "ab" * 32, 11, {"k": "v"}),
        UpdateHeader("dev", "", "v0", "v1", "ab" * 32, 10, {"k": "w"}),
    ]
    assert not any(v.verify(key.public_key(), sig) for v in variants)
