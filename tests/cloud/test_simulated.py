"""The cloud on virtual time: a job's update is visible at its start + the modelled duration, never earlier, at
most ``gpus`` jobs run at once, and the barrier tells the simulator where to hold time."""

from __future__ import annotations

import math
import threading

from cloud.adaptation.config import AdaptationConfig
from cloud.adaptation.executor import InProcessExecutor
from cloud.adaptation.worker import JobSpec
from cloud.config import SimulationConfig
from cloud.simulated import ModelledExecutor
from common.clock import SharedClock
from sim.clock import VirtualClock


class _GatedWorker:
    """Finishes a job when the test opens its gate (the learner itself is tested elsewhere)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def run(self, spec: JobSpec) -> str:
        assert self.gate.wait(30)
        return f"result of {spec.job_id}"


def _spec(job_id: int, samples: int) -> JobSpec:
    rows = [("d", i, b"", {}) for i in range(samples)]
    return JobSpec(job_id, f"device:d{job_id}", "device", f"d{job_id}", "fam", rows)


def _executor(tmp_path, **fields):
    harness = VirtualClock(tmp_path / "clock.bin")
    worker = _GatedWorker()
    inner = InProcessExecutor(AdaptationConfig(executor="inprocess"), tmp_path, worker=worker)
    config = SimulationConfig(clock_file=tmp_path / "clock.bin", **fields)
    return harness, worker, ModelledExecutor(inner, config, SharedClock(tmp_path / "clock.bin"), epochs=2)


def test_an_update_is_held_until_its_modelled_time(tmp_path):
    harness, worker, ex = _executor(
        tmp_path, gpus=1, job_overhead_s=4, teacher_samples_per_s=10, learner_samples_per_s=5
    )
    harness.advance_to(1.0)
    ex.submit(_spec(1, samples=10))  # 4 + 10/10 + 10*2/5 = 9 s: due at 10
    assert ex.barrier() == 10.0 and ex.free_slots() == 0
    worker.gate.set()
    assert ex.poll(5.0) == []  # finished on the host, not yet visible
    harness.advance_to(9.99)
    assert ex.poll(0.1) == []
    harness.advance_to(10.0)
    [fin] = ex.poll(0.1)
    assert fin.result == "result of 1" and fin.seconds == 9.0
    assert ex.barrier() == math.inf and ex.free_slots() == 1
    ex.close()


def test_the_host_profile_publishes_after_what_it_took_here(tmp_path):
    harness, worker, ex = _executor(tmp_path, host=True)
    ex.submit(_spec(2, samples=3))
    assert ex.barrier() == math.inf  # nothing to hold time for: the host decides
    worker.gate.set()
    finished = []
    for _ in range(50):
        finished += ex.poll(0.1)
        harness.advance_to(harness.monotonic() + 1.0)
        if finished:
            break
    assert [f.result for f in finished] == ["result of 2"]
    ex.close()


def test_modelled_gpus_run_at_once_whatever_the_host_runs(tmp_path):
    """Two modelled GPUs, a host executor with one slot: both jobs start in virtual time at once."""
    harness, worker, ex = _executor(
        tmp_path, gpus=2, job_overhead_s=1, teacher_samples_per_s=10, learner_samples_per_s=10
    )
    ex.submit(_spec(1, samples=10))  # 1 + 1 + 2 = 4 s
    assert ex.free_slots() == 1  # the host's one slot is taken; a modelled GPU is still free
    ex.submit(_spec(2, samples=10))
    assert ex.free_slots() == 0 and ex.barrier() == 4.0
    worker.gate.set()
    harness.advance_to(4.0)
    done = []
    for _ in range(100):
        done += ex.poll(0.05)
        if len(done) == 2:
            break
    assert sorted(f.result for f in done) == ["result of 1", "result of 2"]
    assert all(f.seconds == 4.0 for f in done)
    ex.close()
