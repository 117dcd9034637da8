"""kill -9 of the trainer process mid-job, then a restart on the same data directory: the job reruns and
exactly one update is published for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from cloud.devices import DeviceRegistry
from cloud.samples import SqliteSampleStore
from cloud.updates import SqliteUpdateRegistry
from common.signing import generate_private_key
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads, newest_job, store_samples
from tests.transport_support import REPO_ROOT


def _trainer(data_dir, config_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--role", "trainer", "--config", str(config_path)]
    cmd += ["--data-dir", str(data_dir), "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
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


def test_kill9_mid_job_then_restart_publishes_exactly_once(tmp_path, micro_zoo):
    data_dir = tmp_path / "data"
    adaptation = adaptation_config(micro_zoo, max_attempts=3)
    adaptation.akd["epochs"] = 80  # seconds of training: time to kill the process mid-job
    config_path = tmp_path / "cloud.yaml"
    config_path.write_text(
        yaml.safe_dump({"sqlite_synchronous": "NORMAL", "adaptation": adaptation.model_dump(mode="json")})
    )
    samples = SqliteSampleStore(data_dir / "samples.db", synchronous="NORMAL")
    devices = DeviceRegistry(data_dir / "devices.db", "NORMAL")
    devices.register("dev-1", cohort="", model_family=FAMILY, model_version="1", capabilities={})
    store_samples(samples, "dev-1", make_uploads(micro_zoo, 24))
    samples.close(), devices.close()
    jobs_db = data_dir / "adaptation" / "jobs.db"

    proc = _trainer(data_dir, config_path)
    try:
        _wait(lambda: (j := newest_job(jobs_db)) is not None and j.state == "running", proc, 120, "the job to run")
        time.sleep(1.0)
        assert not (data_dir / "adaptation" / "learners" / "device" / "dev-1" / "pending.json").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = newest_job(jobs_db)
    assert killed.state == "running" and killed.attempts == 1  # it died mid-job

    proc = _trainer(data_dir, config_path)
    try:
        done = _wait(lambda: (j := newest_job(jobs_db)) is not None and j.state == "done" and j, proc, 300, "the rerun")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done.job_id == killed.job_id and done.attempts == 2 and done.outcome == "published"
    assert done.error == "service stopped mid-job"
    registry = SqliteUpdateRegistry(data_dir / "updates", generate_private_key(), "NORMAL")
    records = registry.list(device_id="dev-1")
    registry.close()
    assert len(records) == 1 and records[0].update_id == done.update_id
    assert records[0].metadata["job_id"] == str(done.job_id) and records[0].target_version == "v1"
