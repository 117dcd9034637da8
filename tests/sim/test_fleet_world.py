"""The world source on a fake clock (frames due at the request rate, the drift's domain, a camera that drops what
it could not deliver, scoring) and the weight-sharing agent copies."""

from __future__ import annotations

import torch

from sim.fleet.scenario import Scenario
from sim.fleet.shared_model import shared_copy, shares_weights
from sim.fleet.world_source import MAX_FRAMES_PER_POLL, WorldSource
from sim.world import World

SCENARIO = Scenario.model_validate(
    {
        "name": "w",
        "duration_s": 100,
        "groups": [
            {
                "name": "a",
                "count": 2,
                "request_rate_hz": 2,
                "drift": [{"at_s": 0, "domain": "clear"}, {"at_s": 10, "domain": "night"}],
            }
        ],
    }
)


def _source(index: int = 0):
    clock = [0.0]
    spec = SCENARIO.devices()[index]
    return WorldSource(spec, World(0, 32), start=0.0, clock=lambda: clock[0]), clock


def test_frames_follow_rate_and_drift():
    src, clock = _source()
    frames = []
    for step in range(40):  # 0 .. 19.5 s at 2 Hz: 40 frames
        clock[0] = step * 0.5
        frames += src.poll()
    assert len(frames) == 40 and src.dropped == 0
    domains = [f.metadata["sim_domain"] for f in frames]
    assert domains[:20] == ["clear"] * 20 and set(domains[20:]) == {"night"}
    assert all(f.image.dtype.name == "uint8" and f.question for f in frames)
    first = frames[0]
    assert "answer" not in first.metadata  # the truth stays in the harness
    right, captured = src.score(int(first.metadata["sim_index"]), src.truth[int(first.metadata["sim_index"])])
    assert right and captured == 0.0
    assert src.score(int(first.metadata["sim_index"]), "x") is None  # scored once


def test_devices_have_their_own_streams_and_a_stalled_camera_drops():
    a, clock_a = _source(0)
    b, clock_b = _source(1)
    clock_a[0] = clock_b[0] = 0.0
    fa, fb = a.poll(), b.poll()
    assert fa[0].metadata["sim_index"] != fb[0].metadata["sim_index"]
    clock_a[0] = 30.0  # 60 frames fell due while the device was busy
    late = a.poll()
    assert len(late) == MAX_FRAMES_PER_POLL and a.dropped == 61 - 1 - MAX_FRAMES_PER_POLL
    a.stop()
    clock_a[0] = 40.0
    assert a.poll() == []


def test_shared_copy_shares_frozen_weights_not_modules():
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    base.register_buffer("scale", torch.ones(4))
    copy = shared_copy(base)
    assert copy is not base and copy[0] is not base[0]
    assert shares_weights(copy, base) and copy.scale.data_ptr() == base.scale.data_ptr()
    copy.add_module("extra", torch.nn.Linear(4, 1))  # an adapter added to one copy stays its own
    assert not hasattr(base, "extra")
