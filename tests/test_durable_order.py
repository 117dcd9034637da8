"""The write order a power cut needs (tests/durable_support.py's rules), recorded from the real calls of
common/durable.py, the blob store and the device's adapter store. The learner store's check is in
tests/cloud/test_learner_write_order.py (it needs a model)."""

from __future__ import annotations

import os

import torch
from durable_support import FsTrace, tracing

import device.agent.store as adapter_store_module
from cloud.blobs.directory import DirectoryBlobStore
from common.durable import replace_atomically
from device.agent.store import AdapterState, AdapterStore


def test_replace_atomically_syncs_data_then_renames_then_syncs_the_directory(tmp_path):
    for content in (b"first", b"second"):  # a new name, then replacing it
        with tracing(tmp_path, commit_points={"state.json"}) as trace:
            replace_atomically(tmp_path / "state.json", content)
        tmp, final = str(tmp_path / "state.json.tmp"), str(tmp_path / "state.json")
        expected = [("write", tmp), ("fsync", tmp), ("rename", tmp, final), ("fsync", str(tmp_path))]
        assert [e for e in trace.events if e[0] != "create"] == expected
        assert trace.violations() == []
    assert (tmp_path / "state.json").read_bytes() == b"second"


def test_the_checker_flags_each_misordered_write(tmp_path):
    """The rules can fail: a rename before the data's fsync, a return before the directory's fsync, and a
    commit point set while the file it names sits in an unsynced directory."""
    path, tmp = tmp_path / "a.json", tmp_path / "a.json.tmp"
    with tracing(tmp_path) as trace:
        tmp.write_bytes(b"x")
        os.replace(tmp, path)
    assert [v[0] for v in trace.violations()] == ["A", "B"]
    sub = tmp_path / "versions"
    with tracing(tmp_path, commit_points={"HEAD"}) as trace:
        sub.mkdir()
        replace_atomically(sub / "v1", b"weights")  # synced inside versions/, but versions/ itself is a new entry
        replace_atomically(tmp_path / "HEAD", b"v1")
    assert [v[:2] for v in trace.violations()] == ["C:"]
    synthetic = FsTrace(tmp_path)
    synthetic.events = [("create", str(path)), ("write", str(path)), ("fsync", str(path))]
    assert [v[0] for v in synthetic.violations()] == ["B"]  # the new name's directory entry was never synced


def test_blob_store_puts_are_durable_when_they_return(tmp_path):
    store = DirectoryBlobStore(tmp_path / "blobs")
    prepared = store.new_key("updates")
    for key, data in (("samples/a/1", b"new key"), (prepared, b"prepared key"), ("samples/a/1", b"overwrite")):
        with tracing(tmp_path) as trace:
            store.put(key, data)
        assert trace.events and trace.violations() == [], (key, trace.events)
        assert store.get(key) == data


def _adapter(version: str, seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(version, {"layer.lora_A.weight": torch.randn(4, 8, generator=g)})


def test_adapter_store_syncs_the_version_directory_before_it_swaps_head(tmp_path):
    store = AdapterStore(tmp_path / "adapters", {"r": 4})
    steps = [
        ("commit v0", lambda: store.commit(_adapter("v0", 0))),
        ("commit v1", lambda: store.commit(_adapter("v1", 1))),
        ("rollback", lambda: store.rollback("guard")),
        ("acknowledge", store.acknowledge_rollback),
        ("commit v2", lambda: store.commit(_adapter("v2", 2))),
    ]
    for what, step in steps:
        with tracing(tmp_path, commit_points={"HEAD.json"}, rust_writers=[adapter_store_module]) as trace:
            step()
        renames = [e for e in trace.events if e[0] == "rename"]
        assert renames and renames[-1][2] == str((tmp_path / "adapters" / "HEAD.json").resolve()), what
        assert trace.violations() == [], (what, trace.events)
    assert AdapterStore(tmp_path / "adapters").current().version == "v2"
