"""The trainer's job store on SQLite and on PostgreSQL: the same contract, and on PostgreSQL safe to share."""

from __future__ import annotations

import threading

import pytest
from store_support import make_backend, pg_dsn  # noqa: F401 (fixture)

from cloud.adaptation.jobs import JobError, NewJob, SeqRange
from cloud.config import GatewayConfig
from cloud.stores import open_job_store


def _job(subject: str, upto: int = 5) -> NewJob:
    return NewJob("device", subject, "f", (SeqRange(subject, 0, upto),), upto, 100, "test")


@pytest.fixture(params=["sqlite", "postgres-dir"])
def open_jobs(request, tmp_path):
    backend = make_backend(request.param, tmp_path / "state", request)
    cfg = GatewayConfig(**backend.fields())
    opened = []

    def factory():
        store = open_job_store(cfg, cfg.adaptation_dir, "NORMAL")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def test_job_lifecycle_survives_reopen(open_jobs):
    store = open_jobs()
    first = store.create(_job("a"))
    assert first is not None and first.state == "queued" and first.ranges == (SeqRange("a", 0, 5),)
    assert store.create(_job("a", 9)) is None  # never two at once for one device
    assert store.cursor("a")[0] == 5  # the refused job did not move the cursor
    other = store.create(_job("b"))
    (claimed,) = store.claim(1, max_attempts=3)
    assert claimed.job_id == first.job_id and claimed.state == "running" and claimed.attempts == 1
    store.close()
    store = open_jobs()  # the service was killed: the running job is requeued when the next one starts
    assert store.recover() == [first.job_id]
    assert store.get(first.job_id).state == "queued" and store.cursor("a")[0] == 5
    assert {j.job_id for j in store.claim(5, max_attempts=3)} == {first.job_id, other.job_id}
    again = store.fail(first.job_id, "RuntimeError: x", max_attempts=3)
    assert again.state == "queued" and again.error == "RuntimeError: x"
    store.claim(5, 3)
    assert store.fail(first.job_id, "RuntimeError: y", max_attempts=2).state == "failed"
    assert store.create(_job("a", 12)) is not None  # a failed job no longer blocks its subject
    assert store.cursor("a")[0] == 12
    with pytest.raises(JobError, match="queued or running job"):
        store.retry(first.job_id)
    with pytest.raises(JobError, match="only failed jobs"):
        store.retry(other.job_id)
    done = store.finish(other.job_id, "published", {"bytes": 10}, update_id=4)
    assert done.state == "done" and done.update_id == 4 and done.result == {"bytes": 10}
    with pytest.raises(JobError, match="not running"):
        store.finish(other.job_id, "published", {})
    with pytest.raises(JobError, match="not running"):
        store.fail(other.job_id, "x", 3)
    assert store.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 1}
    assert [j.job_id for j in store.list(state="failed")] == [first.job_id]
    assert [j.subject for j in store.list(subject="a")] == ["a", "a"]
    assert store.get_meta("cursor", "0") == "0"
    store.set_meta("cursor", "7")
    store.set_meta("cursor", "8")
    assert open_jobs().get_meta("cursor") == "8"


def test_concurrent_trainers_never_share_a_job(open_jobs):
    stores = [open_jobs() for _ in range(3)]
    created = [stores[0].create(_job(f"d{i}")) for i in range(30)]
    assert all(created)
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(store) -> None:
        while True:
            got = store.claim(2, max_attempts=3)
            if not got:
                return
            with lock:
                claimed.extend(j.job_id for j in got)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.job_id for j in created)  # each job claimed by exactly one trainer
    results = []

    def create(store) -> None:
        results.append(store.create(_job("contested")))

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1  # one active job per subject, whoever asks
