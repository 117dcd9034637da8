"""The learner store's write order under a power cut (tests/durable_support.py's rules): a generation, the mirror
versions it names and its update are on disk before ``pending.json`` or ``current.json`` name them."""

from __future__ import annotations

from durable_support import tracing

import cloud.adaptation.state as state_module
from cloud.adaptation.state import LearnerStore
from cloud.adaptation.worker import LocalLabeler, Worker
from tests.cloud.adaptation_support import FAMILY, adaptation_config

KEY = "device:dev-1"


def test_learner_generations_are_synced_before_pending_and_current_name_them(tmp_path, micro_zoo):
    cfg = adaptation_config(micro_zoo)
    learner = Worker(cfg, tmp_path / "unused", LocalLabeler(cfg)).build_learner(FAMILY)
    root = tmp_path / "adaptation"
    store = LearnerStore(root)
    root.mkdir(parents=True, exist_ok=True)

    def traced(what, step):
        with tracing(root, {"current.json", "pending.json"}, rust_writers=[state_module]) as trace:
            out = step()
        assert trace.events and trace.violations() == [], (what, trace.events)
        return out

    gen = traced("first save", lambda: store.save(KEY, learner))  # every directory is new here
    traced("promote", lambda: store.promote(KEY, gen))
    learner.history["v1"] = {k: v + 1 for k, v in learner.history["v0"].items()}  # a new mirror version to write
    pending = traced("save_pending", lambda: store.save_pending(KEY, learner, 7, b"update", "{}"))
    traced("promote pending", lambda: store.promote(KEY, pending.generation))
    assert store.pending(KEY) is None and store.current(KEY)["history"] == ["v0", "v1"]
