"""A job's uploads: read from the sample store, decoded and checked against the family; bad ones skipped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cloud.adaptation.jobs import SeqRange
from cloud.samples.base import SampleStore
from common.sample_codec import UploadSample, decode_sample
from common.tensor_pack import PayloadError


@dataclass
class Upload:
    """One decoded upload and where it came from."""

    device_id: str
    seq: int
    payload: bytes
    sample: UploadSample


@dataclass
class JobUploads:
    """The usable uploads of a job and a reason for each one skipped."""

    uploads: list[Upload] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    bytes: int = 0


def read_raw(store: SampleStore, ranges: Sequence[SeqRange], limit: int) -> list[tuple[str, int, bytes, dict]]:
    """``(device_id, seq, payload, metadata)`` of every stored sample in ``ranges`` (at most ``limit``, newest
    kept)."""
    rows = []
    for r in ranges:
        for s in store.iter_samples(r.device_id, after_seq=r.after_seq):
            if s.seq > r.upto_seq:
                break
            rows.append((s.device_id, s.seq, s.payload, dict(s.metadata)))
    return rows[-limit:]


def decode_uploads(rows: Sequence[tuple[str, int, bytes, dict]], family: str, feature_dim: int) -> JobUploads:
    """Decode each payload; skip (with a reason) corrupt payloads, other families' samples, wrong feature widths."""
    out = JobUploads()
    for device_id, seq, payload, meta in rows:
        reason = _check_family(meta, family)
        sample = None
        if reason is None:
            try:
                sample = decode_sample(payload)
            except PayloadError as exc:
                reason = f"corrupt payload: {exc}"
        if sample is not None and sample.features.shape[1] != feature_dim:
            reason = f"features of width {sample.features.shape[1]}, family {family!r} expects {feature_dim}"
        if reason is not None or sample is None:
            out.skipped.append({"device_id": device_id, "seq": seq, "reason": reason})
            continue
        out.uploads.append(Upload(device_id, seq, payload, sample))
        out.bytes += len(payload)
    return out


def _check_family(meta: dict, family: str) -> str | None:
    claimed = meta.get("model_family")
    if claimed is not None and claimed != family:
        return f"sample of model family {claimed!r}, job trains {family!r}"
    return None
