"""Reassembles chunked samples of one Upload stream and rejects malformed or inconsistent chunks."""

from __future__ import annotations

from dataclasses import dataclass

from cloud.gateway.handlers import MalformedMessage
from cloud.samples.base import Sample
from common import clock as clocks
from common.feature_codec import FORMAT_V2, is_v2
from common.sample_codec import FORMAT as SAMPLE_FORMAT
from common.sample_codec import check_sample
from common.tensor_pack import PayloadError
from protocol.limits import MAX_METADATA_ENTRIES, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS
from protocol.payload import FORMAT_OPAQUE, FORMAT_SAFETENSORS, check_payload
from protocol.tandem.v1 import gateway_pb2, tensors_pb2

MAX_SEQ = 2**63 - 1
"""Seqs are stored as signed 64-bit integers."""


class ProtocolViolation(ValueError):
    """A client message breaks the protocol; its text goes back as the INVALID_ARGUMENT detail.

    ``sample_seq`` is set when the sample itself is at fault (digest, size, tensors, metadata), so resending
    it can never succeed; the gateway names it in a trailer and the device sets the sample aside.
    """

    def __init__(self, message: str, sample_seq: int | None = None) -> None:
        super().__init__(message)
        self.sample_seq = sample_seq


@dataclass
class _Partial:
    seq: int
    expected_size: int
    first: gateway_pb2.SampleChunk
    parts: list[bytes]
    received: int


class SampleAssembler:
    """Feed chunks in stream order; complete samples come out. Seqs must strictly increase within a stream."""

    def __init__(self, device_id: str, chunk_size: int, max_sample_bytes: int) -> None:
        self.device_id = device_id
        self.chunk_size = chunk_size
        self.max_sample_bytes = max_sample_bytes
        self._partial: _Partial | None = None
        self._last_seq = 0

    @property
    def in_sample(self) -> bool:
        """True while a sample has started and is not complete."""
        return self._partial is not None

    @property
    def expected_size(self) -> int:
        """Declared size of the sample in progress (0 when none)."""
        return self._partial.expected_size if self._partial is not None else 0

    def add(self, chunk: gateway_pb2.SampleChunk | MalformedMessage) -> tuple[Sample, tensors_pb2.PayloadInfo] | None:
        """Consume one chunk; return the sample it completes (unchecked, see ``verify``) and its info."""
        if isinstance(chunk, MalformedMessage):
            raise ProtocolViolation(chunk.describe())
        if len(chunk.data) > self.chunk_size:
            raise ProtocolViolation(
                f"seq {chunk.seq}: chunk of {len(chunk.data)} bytes exceeds chunk_size {self.chunk_size}"
            )
        if self._partial is None:
            self._start(chunk)
        partial = self._partial
        assert partial is not None
        if chunk.seq != partial.seq:
            raise ProtocolViolation(f"seq {chunk.seq} started before seq {partial.seq} was complete")
        if chunk.offset != partial.received:
            raise ProtocolViolation(f"seq {chunk.seq}: chunk offset {chunk.offset} != expected {partial.received}")
        if chunk.offset > 0 and (chunk.HasField("payload") or chunk.metadata):
            raise ProtocolViolation(f"seq {chunk.seq}: payload info and metadata belong to the first chunk only")
        partial.received += len(chunk.data)
        if partial.received > partial.expected_size:
            raise ProtocolViolation(f"seq {chunk.seq}: more data than the declared size {partial.expected_size}")
        partial.parts.append(chunk.data)
        if partial.received < partial.expected_size:
            if not chunk.data:
                raise ProtocolViolation(f"seq {chunk.seq}: empty chunk before the sample is complete")
            return None
        return self._finish(partial)

    def _start(self, chunk: gateway_pb2.SampleChunk) -> None:
        if not 1 <= chunk.seq <= MAX_SEQ:
            raise ProtocolViolation(f"seq must be between 1 and {MAX_SEQ}, got {chunk.seq}")
        if chunk.seq <= self._last_seq:
            raise ProtocolViolation(f"seq {chunk.seq} not above previous seq {self._last_seq} in this stream")
        if chunk.offset != 0:
            raise ProtocolViolation(f"seq {chunk.seq}: first chunk must have offset 0, got {chunk.offset}")
        if not chunk.HasField("payload"):
            raise ProtocolViolation(f"seq {chunk.seq}: first chunk must carry payload info (size, sha256)")
        info = chunk.payload
        if info.size > self.max_sample_bytes:
            raise ProtocolViolation(
                f"seq {chunk.seq}: sample of {info.size} bytes exceeds max_sample_bytes {self.max_sample_bytes}",
                chunk.seq,
            )
        if len(info.sha256) != 32:
            raise ProtocolViolation(f"seq {chunk.seq}: sha256 must be 32 bytes, got {len(info.sha256)}")
        _check_metadata(chunk.seq, chunk.metadata)
        self._partial = _Partial(chunk.seq, info.size, chunk, [], 0)

    def _finish(self, partial: _Partial) -> tuple[Sample, tensors_pb2.PayloadInfo]:
        data = b"".join(partial.parts)
        self._partial = None
        self._last_seq = partial.seq
        sample = Sample(
            device_id=self.device_id,
            seq=partial.seq,
            payload=data,
            metadata=dict(partial.first.metadata),
            created_unix_ms=partial.first.created_unix_ms,
            received_unix_ms=clocks.current().now_ms(),
        )
        return sample, partial.first.payload

    def discard(self) -> None:
        """Drop a sample in progress (the stream is over)."""
        self._partial = None

    def finish(self) -> None:
        """Call at end of stream: raises when a sample was left incomplete."""
        if self._partial is not None:
            raise ProtocolViolation(
                f"seq {self._partial.seq}: stream ended after {self._partial.received} of "
                f"{self._partial.expected_size} bytes"
            )


def verify(sample: Sample, info: tensors_pb2.PayloadInfo) -> None:
    """Raise ProtocolViolation unless the payload is what it claims and what the cloud can use.

    Size, digest and tensor list must match the declaration, the format must be safetensors (/1) or opaque
    (/2, on a basis this cloud knows), and the bytes
    must pass ``common.sample_codec.check_sample``: every check ``decode_sample`` makes, so nothing enters
    the store that the trainer would refuse.
    """
    problem = check_payload(sample.payload, info)
    wanted = FORMAT_OPAQUE if is_v2(sample.payload) else FORMAT_SAFETENSORS
    if problem is None and info.format != wanted:
        problem = (
            f"payload format must be {FORMAT_SAFETENSORS!r} ({SAMPLE_FORMAT}) or {FORMAT_OPAQUE!r} "
            f"({FORMAT_V2}), got {info.format[:40]!r}"
        )
    if problem is None:
        try:
            check_sample(sample.payload)
        except PayloadError as exc:
            problem = str(exc)
    if problem:
        raise ProtocolViolation(f"seq {sample.seq}: {problem}", sample.seq)


def _check_metadata(seq: int, metadata) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise ProtocolViolation(f"seq {seq}: more than {MAX_METADATA_ENTRIES} metadata entries", seq)
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise ProtocolViolation(f"seq {seq}: metadata key must be 1-{MAX_METADATA_KEY_CHARS} chars", seq)
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ProtocolViolation(
                f"seq {seq}: metadata value of {key!r} exceeds {MAX_METADATA_VALUE_CHARS} chars", seq
            )
