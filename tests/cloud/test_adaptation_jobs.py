"""The durable job store and the scheduler's triggers (real SQLite, no models)."""

from __future__ import annotations

import pytest

from cloud.adaptation.config import AdaptationConfig
from cloud.adaptation.job_store import SqliteJobStore
from cloud.adaptation.jobs import JobError, NewJob, SeqRange
from cloud.adaptation.scheduler import Scheduler
from cloud.devices import DeviceRegistry
from cloud.samples import SqliteSampleStore
from tests.cloud.adaptation_support import store_samples


def _job(subject: str, upto: int = 5) -> NewJob:
    return NewJob("device", subject, "f", (SeqRange(subject, 0, upto),), upto, 100, "test")


def test_one_active_job_per_subject_and_state_survives_reopen(tmp_path):
    path = tmp_path / "jobs.db"
    store = SqliteJobStore(path)
    first = store.create(_job("a"))
    assert first is not None and first.state == "queued"
    assert store.create(_job("a", 9)) is None  # never two at once for one device
    assert store.cursor("a")[0] == 5  # the refused job did not move the cursor
    other = store.create(_job("b"))
    (claimed,) = store.claim(1, max_attempts=3)
    assert claimed.job_id == first.job_id and claimed.state == "running" and claimed.attempts == 1
    store.close()
    # The service was killed: the running job is requeued when the next one starts.
    store = SqliteJobStore(path)
    assert store.recover() == [first.job_id]
    assert store.get(first.job_id).state == "queued" and store.cursor("a")[0] == 5
    claimed = {j.job_id for j in store.claim(5, max_attempts=3)}
    assert claimed == {first.job_id, other.job_id}
    again = store.fail(first.job_id, "RuntimeError: x", max_attempts=3)
    assert again.state == "queued" and again.error == "RuntimeError: x"  # kept as history
    store.claim(5, 3)
    assert store.fail(first.job_id, "RuntimeError: y", max_attempts=2).state == "failed"
    assert store.create(_job("a", 12)) is not None  # a failed job no longer blocks its subject
    with pytest.raises(JobError, match="queued or running job"):
        store.retry(first.job_id)
    done = store.finish(other.job_id, "published", {"bytes": 10}, update_id=4)
    assert done.state == "done" and done.update_id == 4 and done.result == {"bytes": 10}
    with pytest.raises(JobError, match="not running"):
        store.finish(other.job_id, "published", {})
    assert store.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1}
    store.close()


def _scheduler(tmp_path, **cfg):
    samples = SqliteSampleStore(tmp_path / "samples.db", synchronous="NORMAL")
    devices = DeviceRegistry(tmp_path / "devices.db", "NORMAL")
    jobs = SqliteJobStore(tmp_path / "jobs.db", "NORMAL")
    config = AdaptationConfig.model_validate({"families": {"f": {}}, **cfg})
    return Scheduler(config, samples, jobs), samples, devices, jobs


def test_triggers_by_count_bytes_and_interval(tmp_path):
    sched, samples, devices, jobs = _scheduler(
        tmp_path, trigger={"min_samples": 10, "min_bytes": 5000, "max_interval_s": 60}
    )
    for dev in ("count", "bytes", "slow"):
        devices.register(dev, cohort="", model_family="f", model_version="1", capabilities={})
    store_samples(samples, "count", [b"x" * 10] * 10)
    store_samples(samples, "bytes", [b"x" * 2600] * 2)
    store_samples(samples, "slow", [b"x" * 10] * 3)
    now = sched.started_ms + 1000
    created = {jobs.get(i).subject: jobs.get(i) for i in sched.update(devices.list(), now_ms=now)}
    assert set(created) == {"count", "bytes"}
    assert created["count"].reason == "10 new samples" and created["bytes"].reason == "5200 new bytes"
    assert sched.update(devices.list(), now_ms=now) == []  # nothing new, and the active jobs block anyway
    later = sched.update(devices.list(), now_ms=sched.started_ms + 61_000)
    assert [jobs.get(i).subject for i in later] == ["slow"]
    assert jobs.get(later[0]).ranges == (SeqRange("slow", 0, 3),)


def test_cohort_jobs_pool_their_devices(tmp_path):
    sched, samples, devices, jobs = _scheduler(tmp_path, cohort_training=True, cohort_trigger={"min_samples": 8})
    for dev, cohort in (("a", "north"), ("b", "north"), ("c", "")):
        devices.register(dev, cohort=cohort, model_family="f", model_version="1", capabilities={})
    store_samples(samples, "a", [b"x"] * 5)
    store_samples(samples, "b", [b"x"] * 4)
    store_samples(samples, "c", [b"x"] * 3)
    (job_id,) = sched.update(devices.list(), now_ms=sched.started_ms + 1)
    job = jobs.get(job_id)
    assert job.key == "cohort:north" and job.samples == 9
    assert set(job.ranges) == {SeqRange("a", 0, 5), SeqRange("b", 0, 4)}


class _CountingSamples(SqliteSampleStore):
    """The real store, counting the per-device pending reads the scheduler makes."""

    reads = 0

    def pending_stats(self, device_id, after_seq, limit):
        type(self).reads += 1
        return super().pending_stats(device_id, after_seq, limit)


def test_a_turn_reads_only_the_devices_whose_samples_or_cursor_moved(tmp_path):
    samples = _CountingSamples(tmp_path / "samples.db", synchronous="NORMAL")
    devices = DeviceRegistry(tmp_path / "devices.db", "NORMAL")
    jobs = SqliteJobStore(tmp_path / "jobs.db", "NORMAL")
    sched = Scheduler(AdaptationConfig.model_validate({"families": {"f": {}}, "trigger": {"min_samples": 4}}),
                      samples, jobs)  # fmt: skip
    for i in range(20):
        devices.register(f"d{i}", cohort="", model_family="f", model_version="1", capabilities={})
    for i in range(5):
        store_samples(samples, f"d{i}", [b"x"] * 2)  # pending, below the trigger
    assert samples.high_waters() == {f"d{i}": 2 for i in range(5)}
    now = sched.started_ms + 1
    assert sched.update(devices.list(), now_ms=now) == [] and _CountingSamples.reads == 5  # 15 have none
    assert sched.update(devices.list(), now_ms=now) == [] and _CountingSamples.reads == 5  # nothing moved
    store_samples(samples, "d3", [b"x"] * 2, first_seq=3)
    (job_id,) = sched.update(devices.list(), now_ms=now)
    assert _CountingSamples.reads == 6 and jobs.get(job_id).ranges == (SeqRange("d3", 0, 4),)
