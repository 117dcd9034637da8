"""Bounded hypothesis fuzzing of raw Upload messages, header mutations included: never UNKNOWN or INTERNAL, and
the gateway still serves afterwards (issue 19; ``bench/gateway_fuzz.py`` runs the same mutations at scale)."""

from __future__ import annotations

import json
import random
import struct

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transport_support import registered_client, running_gateway, sample_payload

from bench.gateway_fuzz import _chunks, fuzz_frames
from device.transport.outbox import OutboxItem
from device.transport.retry import is_local_send_failure

BASE = sample_payload(7, 3000)
HEADER_LEN = struct.unpack("<Q", BASE[:8])[0]
HEADER = json.loads(BASE[8 : 8 + HEADER_LEN])
BODY = BASE[8 + HEADER_LEN :]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_headers(draw) -> bytes:
    """The sample's header with one entry's field (or the metadata) replaced by arbitrary JSON."""
    header = json.loads(json.dumps(HEADER))
    name = draw(st.sampled_from(sorted(header)))
    if name == "__metadata__":
        key = draw(st.sampled_from(["format", "num_patches", "uncertainty", "question", "other"]))
        header[name][key] = draw(st.one_of(st.text(max_size=40), json_values))
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if draw(st.booleans()) and field in header[name]:
            del header[name][field]
        else:
            header[name][field] = draw(json_values)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + BODY


streams = st.one_of(
    mutated_headers().map(lambda data: [m.SerializeToString() for m in _chunks(1, data)]),
    st.integers(0, 2**32).map(lambda seed: fuzz_frames(random.Random(seed), 1, BASE)[1]),
    st.lists(st.binary(max_size=200), min_size=1, max_size=3),  # arbitrary frames
)


def test_fuzzed_uploads_never_answer_unknown_or_internal(tmp_path, loop):
    gw_cm = running_gateway(tmp_path / "cloud")
    gw = loop.run_until_complete(gw_cm.__aenter__())
    client_cm = registered_client(tmp_path / "dev", gw.address)
    client = loop.run_until_complete(client_cm.__aenter__())
    upload = client.channel.stream_unary(
        "/tandem.v1.DeviceGateway/Upload", request_serializer=None, response_deserializer=None
    )
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(streams)
    def check(frames):
        async def call():
            try:
                await upload(iter(frames), metadata=client._metadata, timeout=10)
                seen.add("OK")
            except grpc.aio.AioRpcError as err:
                if is_local_send_failure(err):  # the client's own write raced the answer; not the gateway's
                    return
                assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), err.details()
                assert err.details()
                seen.add(err.code().name)

        loop.run_until_complete(call())

    try:
        check()
        assert "INVALID_ARGUMENT" in seen
        ok = loop.run_until_complete(client.upload([OutboxItem(2**62, BASE, {}, 0)]))
        assert ok.acked_seq == 2**62  # still serving, and still storing valid samples
        assert loop.run_until_complete(client.heartbeat("ok", "v0", {}, 0)).acked_seq == 2**62
    finally:
        loop.run_until_complete(client_cm.__aexit__(None, None, None))
        loop.run_until_complete(gw_cm.__aexit__(None, None, None))
