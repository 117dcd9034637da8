"""The trainer service in-process (real SQLite stores, no Ray): bad input, exactly-once publishing, rollbacks,
link budgets, job steering from the CLI."""

from __future__ import annotations

import time

import pytest

from cloud.adaptation.executor import InProcessExecutor
from cloud.adaptation.job_store import SqliteJobStore
from cloud.adaptation.jobs import NewJob, SeqRange
from cloud.adaptation.service import TrainerService
from cloud.adaptation.state import LearnerStore
from cloud.adaptation.worker import LocalLabeler, Worker
from cloud.cli import main as cloud_main
from cloud.devices import DeviceRegistry
from cloud.samples import SqliteSampleStore
from cloud.updates import SqliteUpdateRegistry
from common.delta_codec import apply_update, state_digest
from common.signing import generate_private_key
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads, store_samples


@pytest.fixture(scope="module")
def uploads(micro_zoo):
    return make_uploads(micro_zoo, 60)


@pytest.fixture(scope="module")
def worker(micro_zoo, tmp_path_factory):
    """One worker (models loaded once) reused across tests; each test gives it its own state directory."""
    cfg = adaptation_config(micro_zoo)
    return Worker(cfg, tmp_path_factory.mktemp("unused"), LocalLabeler(cfg))


class Cloud:
    """The stores of one data directory plus a trainer on them."""

    def __init__(self, root, zoo, worker, updates=None, **overrides) -> None:
        self.config = adaptation_config(zoo, **overrides)
        self.samples = SqliteSampleStore(root / "samples.db", synchronous="NORMAL")
        self.devices = DeviceRegistry(root / "devices.db", "NORMAL")
        self.updates = updates or SqliteUpdateRegistry(root / "updates", generate_private_key(), "NORMAL")
        self.jobs = SqliteJobStore(root / "adaptation" / "jobs.db", "NORMAL")
        worker.store = LearnerStore(root / "adaptation")
        worker.config = self.config
        executor = InProcessExecutor(self.config, root / "adaptation", worker)
        self.service = TrainerService(
            self.config, root / "adaptation", self.samples, self.devices, self.updates, self.jobs, executor
        )

    def register(self, device_id: str, family: str = FAMILY, cohort: str = "") -> None:
        self.devices.register(device_id, cohort=cohort, model_family=family, model_version="1", capabilities={})

    def run_until_idle(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.service.step(wait_s=0.05)
            counts = self.jobs.counts()
            if counts["queued"] == 0 and counts["running"] == 0 and self.service.executor.free_slots():
                return
        raise AssertionError(f"jobs still active: {self.jobs.counts()}")

    def close(self) -> None:
        self.service.close()
        for s in (self.samples, self.devices, self.updates, self.jobs):
            s.close()


def test_bad_input_is_recorded_and_other_devices_go_on(tmp_path, micro_zoo, worker, uploads):
    cloud = Cloud(tmp_path, micro_zoo, worker)
    for dev in ("dev-ok", "dev-mixed", "dev-corrupt"):
        cloud.register(dev)
    cloud.register("dev-alien", family="no-such-family")
    store_samples(cloud.samples, "dev-ok", uploads[:24])
    store_samples(cloud.samples, "dev-mixed", uploads[:22])
    store_samples(cloud.samples, "dev-mixed", [uploads[30]], first_seq=23, meta={"model_family": "other-family"})
    store_samples(cloud.samples, "dev-mixed", [b"\x10\x00\x00\x00not safetensors"], first_seq=24)
    store_samples(cloud.samples, "dev-corrupt", [b"garbage" * 10] * 21)
    store_samples(cloud.samples, "dev-alien", uploads[:21])
    # A job whose range holds no stored sample (e.g. requeued after the samples were purged).
    ghost = cloud.jobs.create(NewJob("device", "dev-ghost", FAMILY, (SeqRange("dev-ghost", 0, 50),), 0, 0, "manual"))
    cloud.run_until_idle()
    jobs = {j.subject: j for j in cloud.jobs.list()}
    assert jobs["dev-ok"].state == "done" and jobs["dev-ok"].outcome == "published"
    mixed = jobs["dev-mixed"]
    assert mixed.outcome == "published" and mixed.update_id > 0
    reasons = {s["seq"]: s["reason"] for s in mixed.result["skipped"]}
    assert "other-family" in reasons[23] and "corrupt payload" in reasons[24]
    assert jobs["dev-corrupt"].outcome == "skipped" and jobs["dev-corrupt"].result["reason"] == "no usable samples"
    assert len(jobs["dev-corrupt"].result["skipped"]) == jobs["dev-corrupt"].result["skipped_count"] == 21
    assert jobs["dev-alien"].state == "failed" and "unknown model family" in jobs["dev-alien"].error
    assert jobs["dev-alien"].attempts == 1  # permanent: not retried in a loop
    assert cloud.jobs.get(ghost.job_id).result["reason"] == "no samples in the job's ranges"
    published = {r.device_id for r in cloud.updates.list()}
    assert published == {"dev-ok", "dev-mixed"}
    cloud.close()


class CrashAfterPublish(SqliteUpdateRegistry):
    """A registry whose first publish stores the update and then fails, as a process killed right after."""

    crashed = False

    def publish_header(self, *args, **kwargs):
        record = super().publish_header(*args, **kwargs)
        if not self.crashed:
            self.crashed = True
            raise OSError("simulated crash after the update was stored")
        return record


def test_a_crash_between_publish_and_commit_publishes_exactly_once(tmp_path, micro_zoo, worker, uploads):
    registry = CrashAfterPublish(tmp_path / "updates", generate_private_key(), "NORMAL")
    cloud = Cloud(tmp_path, micro_zoo, worker, updates=registry)
    cloud.register("dev-1")
    store_samples(cloud.samples, "dev-1", uploads[:24])
    cloud.run_until_idle()
    (job,) = cloud.jobs.list()
    assert job.state == "done" and job.attempts == 2 and job.result.get("resumed") is True
    (record,) = registry.list(device_id="dev-1")
    assert record.update_id == job.update_id and record.metadata["job_id"] == str(job.job_id)
    # The published payload takes the device from v0 to exactly the mirror the learner now holds.
    learner = worker.load_learner("device:dev-1", FAMILY)
    v0 = learner.history["v0"]
    payload = registry.read_payload(record.update_id, 0, record.size)
    assert learner.mirror.version == "v1" == record.target_version
    assert state_digest(apply_update(v0, payload, "v0", record.header)) == learner.mirror_digest()
    cloud.close()


def test_rollback_rebases_and_the_link_sizes_the_update(tmp_path, micro_zoo, worker, uploads):
    cloud = Cloud(tmp_path, micro_zoo, worker, link={"seconds_of_link": 2.0, "min_bytes": 512})
    cloud.register("dev-1")
    store_samples(cloud.samples, "dev-1", uploads[:24])
    cloud.run_until_idle()
    store_samples(cloud.samples, "dev-1", uploads[24:48], first_seq=25)
    cloud.run_until_idle()
    assert [r.target_version for r in cloud.updates.list(device_id="dev-1")] == ["v1", "v2"]
    # The device rolls back to v1 and reports a slow link (1500 B/s -> a 3000-byte budget).
    cloud.devices.heartbeat("dev-1", status="ok", applied_version="v1", metrics={"downlink_bytes_per_s": 1500.0})
    cloud.devices.record_rollback("dev-1", "v2", "v1", "guard: confidence dropped")
    store_samples(cloud.samples, "dev-1", uploads[:24], first_seq=49)
    cloud.run_until_idle()
    last = cloud.updates.list(device_id="dev-1")[-1]
    assert (last.base_version, last.target_version) == ("v1", "v3")
    assert last.size <= 3000
    job = cloud.jobs.list(limit=1)[0]
    assert job.result["rebased_to"] == "v1" and cloud.jobs.get_meta("rebase:device:dev-1") == ""
    cloud.close()


def test_jobs_cli_lists_shows_and_retries(tmp_path, capsys):
    jobs = SqliteJobStore(tmp_path / "adaptation" / "jobs.db")
    job = jobs.create(NewJob("device", "dev-9", FAMILY, (SeqRange("dev-9", 0, 5),), 5, 500, "5 new samples"))
    jobs.claim(1, 3)
    jobs.fail(job.job_id, "ValueError: boom", max_attempts=1)
    jobs.close()
    args = ["--data-dir", str(tmp_path)]

    def cli(*argv: str) -> int:
        with pytest.raises(SystemExit) as exc:
            cloud_main([*argv, *args])
        return int(exc.value.code or 0)

    assert cli("jobs", "list", "--state", "failed") == 0
    assert "micro" in capsys.readouterr().out
    assert cli("jobs", "show", str(job.job_id)) == 0
    shown = capsys.readouterr().out
    assert "ValueError: boom" in shown and '"dev-9"' in shown
    assert cli("jobs", "retry", str(job.job_id)) == 0
    assert "queued again" in capsys.readouterr().out
    assert cli("jobs", "retry", str(job.job_id)) == 1  # queued now, not failed
    assert "only failed jobs" in capsys.readouterr().err
    assert cli("jobs", "show", "999") == 1
    assert "no job 999" in capsys.readouterr().err
    assert cli("jobs", "list", "--state", "bogus") == 1


def test_a_cohort_trains_one_shared_adapter_that_every_member_applies(tmp_path, micro_zoo, worker, uploads):
    cloud = Cloud(tmp_path, micro_zoo, worker, cohort_training=True, cohort_trigger={"min_samples": 30})
    cloud.register("north-1", cohort="north")
    cloud.register("north-2", cohort="north")
    store_samples(cloud.samples, "north-1", uploads[:16])
    cloud.run_until_idle()
    assert cloud.jobs.counts()["done"] == 0  # 16 pooled samples: below the cohort trigger
    store_samples(cloud.samples, "north-2", uploads[16:34])
    cloud.run_until_idle()
    (job,) = cloud.jobs.list()
    assert job.key == "cohort:north" and job.samples == 34 and job.outcome == "published"
    (record,) = cloud.updates.for_device("north-2", "north")
    assert record.cohort == "north" and record.device_id == "" and record.update_id == job.update_id
    assert cloud.updates.for_device("north-1", "north") == [record]
    # Both members hold v0 and are served this one record (above): applied to v0 it lands on the cohort mirror.
    learner = worker.load_learner("cohort:north", FAMILY)
    payload = cloud.updates.read_payload(record.update_id, 0, record.size)
    for _member in ("north-1", "north-2"):  # both hold v0, both land on the cohort mirror
        applied = apply_update(learner.history["v0"], payload, "v0", record.header)
        assert state_digest(applied) == learner.mirror_digest()
    cloud.close()


def _follow(cloud: Cloud, device_id: str, held: tuple, after_id: int) -> tuple[tuple, int]:
    """Apply, as the device's agent does, every update addressed to it (or its cohort) after ``after_id`` whose
    base is the version it holds; returns ``((state, version), last update id seen)``."""
    state, version = held
    device = cloud.devices.get(device_id)
    for record in cloud.updates.for_device(device_id, device.cohort, after_id):
        after_id = record.update_id
        if record.base_version == version:
            payload = cloud.updates.read_payload(record.update_id, 0, record.size)
            state, version = apply_update(state, payload, version, record.header), record.target_version
    return (state, version), after_id


def test_a_cohort_member_that_rolled_back_catches_up_and_rejoins_the_cohort(tmp_path, micro_zoo, worker, uploads):
    cloud = Cloud(tmp_path, micro_zoo, worker, cohort_training=True, cohort_trigger={"min_samples": 20})
    members = ("north-1", "north-2")
    for m in members:
        cloud.register(m, cohort="north")
    store_samples(cloud.samples, "north-1", uploads[:12])
    store_samples(cloud.samples, "north-2", uploads[12:24])
    cloud.run_until_idle()
    v0 = worker.load_learner("cohort:north", FAMILY).history["v0"]
    held, seen = {m: (v0, "v0") for m in members}, dict.fromkeys(members, 0)
    for m in members:
        held[m], seen[m] = _follow(cloud, m, held[m], seen[m])
    assert {held[m][1] for m in members} == {"v1"}
    # north-1's regression guard takes it back to v0; the cohort trains on and publishes v1 -> v2.
    held["north-1"] = (v0, "v0")
    cloud.devices.record_rollback("north-1", "v1", "v0", "guard: confidence dropped")
    store_samples(cloud.samples, "north-1", uploads[24:36], first_seq=13)
    store_samples(cloud.samples, "north-2", uploads[36:48], first_seq=13)
    cloud.run_until_idle()
    learner = worker.load_learner("cohort:north", FAMILY)
    assert learner.mirror.version == "v2"
    for m in members:  # both end on the cohort's next version, bit for bit
        held[m], seen[m] = _follow(cloud, m, held[m], seen[m])
        assert held[m][1] == "v2" and state_digest(held[m][0]) == learner.mirror_digest(), m
    catch_up = cloud.updates.list(device_id="north-1")
    assert [(r.base_version, r.target_version) for r in catch_up] == [("v0", "v1")]
    cloud.close()
