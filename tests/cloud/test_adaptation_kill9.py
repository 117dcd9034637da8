"""kill -9 of the trainer process mid-job and between publishing an update and committing its job, then a restart
on the same data directory: the job reruns or resumes and exactly one update is published for it.

Both kills land where they must however fast the machine: a test fault point (common/faults.py) holds the job
mid-way until the test has killed the process, or kills the process itself right after the publish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cloud.adaptation.job_store import SqliteJobStore
from cloud.devices import DeviceRegistry
from cloud.samples import SqliteSampleStore
from cloud.updates import SqliteUpdateRegistry
from common.faults import fault_env
from common.signing import generate_private_key
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads, newest_job, store_samples
from tests.transport_support import REPO_ROOT


def _trainer(data_dir, config_path, fault: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--role", "trainer", "--config", str(config_path)]
    cmd += ["--data-dir", str(data_dir), "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **fault_env(fault)}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)


def _wait(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited while waiting for {what}: {proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _job(jobs_db):
    store = SqliteJobStore(jobs_db, "NORMAL")
    try:
        found = store.list()
        return found[0] if found else None
    finally:
        store.close()


def _records(data_dir):
    registry = SqliteUpdateRegistry(data_dir / "updates", generate_private_key(), "NORMAL")
    try:
        return registry.list(device_id="dev-1")
    finally:
        registry.close()


def _setup(tmp_path, micro_zoo) -> tuple[Path, Path]:
    """A data directory with one device and 24 samples (one job's worth), and the trainer's config."""
    data_dir = tmp_path / "data"
    adaptation = adaptation_config(micro_zoo, max_attempts=3)
    config_path = tmp_path / "cloud.yaml"
    config_path.write_text(
        yaml.safe_dump({"sqlite_synchronous": "NORMAL", "adaptation": adaptation.model_dump(mode="json")})
    )
    samples = SqliteSampleStore(data_dir / "samples.db", synchronous="NORMAL")
    devices = DeviceRegistry(data_dir / "devices.db", "NORMAL")
    devices.register("dev-1", cohort="", model_family=FAMILY, model_version="1", capabilities={})
    store_samples(samples, "dev-1", make_uploads(micro_zoo, 24))
    samples.close(), devices.close()
    return data_dir, config_path


def _rerun(data_dir, config_path, fault, jobs_db):
    """Restart the trainer (nothing armed), wait for the job to be done, stop it gracefully."""
    proc = _trainer(data_dir, config_path, fault)
    try:
        done = _wait(lambda: (j := newest_job(jobs_db)) is not None and j.state == "done" and j, proc, 300, "the rerun")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    return done


def test_kill9_mid_job_then_restart_publishes_exactly_once(tmp_path, micro_zoo):
    data_dir, config_path = _setup(tmp_path, micro_zoo)
    jobs_db = data_dir / "adaptation" / "jobs.db"
    fault = tmp_path / "fault"
    fault.write_text("hold:cloud.job_round")  # the job waits at its training round until the kill
    proc = _trainer(data_dir, config_path, fault)
    try:
        _wait(lambda: Path(f"{fault}.held").exists(), proc, 120, "the job to reach its round")
        assert Path(f"{fault}.held").read_text() == f"cloud.job_round {proc.pid}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    fault.unlink()
    killed = _job(jobs_db)
    assert killed.state == "running" and killed.attempts == 1  # it died mid-job ...
    assert _records(data_dir) == []  # ... before anything was published
    assert not (data_dir / "adaptation" / "learners" / "device" / "dev-1" / "pending.json").exists()

    done = _rerun(data_dir, config_path, fault, jobs_db)
    assert done.job_id == killed.job_id and done.attempts == 2 and done.outcome == "published"
    assert done.error == "service stopped mid-job" and "resumed" not in done.result  # trained again from scratch
    records = _records(data_dir)
    assert len(records) == 1 and records[0].update_id == done.update_id
    assert records[0].metadata["job_id"] == str(done.job_id) and records[0].target_version == "v1"


def test_kill9_between_publish_and_commit_then_restart_publishes_exactly_once(tmp_path, micro_zoo):
    data_dir, config_path = _setup(tmp_path, micro_zoo)
    jobs_db = data_dir / "adaptation" / "jobs.db"
    learner_dir = data_dir / "adaptation" / "learners" / "device" / "dev-1"
    fault = tmp_path / "fault"
    fault.write_text("cloud.after_publish")
    proc = _trainer(data_dir, config_path, fault)
    try:
        assert proc.wait(300) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert Path(f"{fault}.fired").read_text() == "cloud.after_publish" and not fault.exists()
    killed = _job(jobs_db)
    (published,) = _records(data_dir)  # the update is in the registry ...
    assert killed.state == "running" and killed.attempts == 1 and killed.update_id == 0  # ... the job not done
    assert published.metadata["job_id"] == str(killed.job_id) and published.target_version == "v1"
    assert (learner_dir / "pending.json").exists()  # and the learner's generation is not live yet

    done = _rerun(data_dir, config_path, fault, jobs_db)
    assert done.job_id == killed.job_id and done.attempts == 2 and done.outcome == "published"
    assert done.result.get("resumed") is True  # the pending generation was published, not a new round trained
    assert _records(data_dir) == [published] and done.update_id == published.update_id  # exactly once
    assert not (learner_dir / "pending.json").exists()
