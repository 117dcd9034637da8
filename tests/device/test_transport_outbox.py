"""Durable outbox: seq order, ack deletes only acked samples, seqs never reused, survives reopen."""

from __future__ import annotations

import pytest
from transport_support import sample_payload

from device.transport.outbox import Outbox, OutboxError

S = [sample_payload(i, 700) for i in range(8)]


def test_put_pending_ack_and_reopen(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    seqs = [box.put(S[i], {"i": i}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    batch = box.pending(max_samples=3)
    assert [it.seq for it in batch] == [1, 2, 3] and batch[1].metadata == {"i": "1"}
    assert box.ack(2) == 2
    box.close()
    box = Outbox(tmp_path / "outbox.db")
    stats = box.stats()
    assert (stats.pending, stats.first_seq, stats.last_seq, stats.acked_seq) == (3, 3, 5, 2)
    box.ack(5)
    assert box.put(S[5]) == 6  # seqs never reused after deletion
    box.ensure_seq_above(100)
    assert box.put(S[6]) == 101


def test_pending_respects_byte_budget_but_returns_one(tmp_path):
    box = Outbox(tmp_path / "o.db")
    for i in range(3):
        box.put(S[i])
    size = len(S[0])
    assert len(box.pending(max_bytes=size + size // 2)) == 1
    assert len(box.pending(max_bytes=size // 2)) == 1
    assert len(box.pending(max_bytes=3 * size + 100)) == 3


def test_rejects_oversize_and_non_bytes(tmp_path):
    box = Outbox(tmp_path / "o.db", max_sample_bytes=len(S[0]) - 1)
    with pytest.raises(OutboxError, match="exceeds"):
        box.put(S[0])
    with pytest.raises(OutboxError, match="bytes"):
        box.put("text")  # type: ignore[arg-type]
    with pytest.raises(OutboxError, match="metadata value"):
        box.put(b"x", {"k": "v" * 5000})
    with pytest.raises(OutboxError, match="metadata entries"):
        box.put(b"x", {str(i): "" for i in range(65)})
    with pytest.raises(OutboxError, match="not a valid sample"):  # the gateway would refuse it for good
        box.put(b"x" * 100)
    assert box.stats().pending == 0


def test_delete_removes_exactly_the_given_samples(tmp_path):
    box = Outbox(tmp_path / "o.db")
    for i in range(6):
        box.put(S[i])
    assert box.delete([4, 5, 6]) == 3  # a later batch acked before an earlier one
    assert [it.seq for it in box.pending()] == [1, 2, 3]
    assert box.delete([4]) == 0 and box.delete([]) == 0
