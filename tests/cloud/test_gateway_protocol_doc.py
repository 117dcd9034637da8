"""docs/protocol.md's worked example is what the code signs, and verifies with a plain Ed25519 library."""

from __future__ import annotations

import hashlib
import json
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from transport_support import REPO_ROOT

from common.signing import key_id, public_key_pem
from protocol.tandem.v1 import gateway_pb2, tensors_pb2
from protocol.updates import header_from_proto

DOC = REPO_ROOT / "docs" / "protocol.md"


def _examples() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- example:(\w+) -->\s*```\w*\n(.*?)\n```", text, flags=re.S)
    return {name: body for name, body in found}


def test_worked_example_matches_the_code_and_a_plain_verifier():
    ex = _examples()
    assert set(ex) == {"public_key_hex", "public_key_pem", "header", "canonical", "key_id", "signature"}
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert ex["public_key_hex"] == raw.hex()
    assert ex["public_key_pem"] + "\n" == public_key_pem(key).decode()
    fields = json.loads(ex["header"])
    payload = fields["payload"].encode()
    wire = gateway_pb2.UpdateHeader(  # what a client receives: the signed fields plus unsigned extras
        update_id=41,
        device_id=fields["device_id"],
        cohort=fields["cohort"],
        base_version=fields["base_version"],
        target_version=fields["target_version"],
        payload=tensors_pb2.PayloadInfo(format="opaque", size=len(payload), sha256=hashlib.sha256(payload).digest()),
        metadata=fields["metadata"],
        created_unix_ms=123,
    )
    header = header_from_proto(wire)
    canonical = header.canonical_bytes()
    assert canonical == ex["canonical"].encode("ascii")
    signature, kid = header.sign(key)
    assert kid == ex["key_id"] == key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]
    assert signature.hex() == ex["signature"]
    # a third-party client needs only the doc's bytes and a plain Ed25519 implementation
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(ex["public_key_hex"])).verify(
        bytes.fromhex(ex["signature"]), ex["canonical"].encode()
    )
    assert header.verify(key.public_key(), bytes.fromhex(ex["signature"]))
