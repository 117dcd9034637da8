"""SIGTERM and SIGINT to ``tandem-cloud serve`` once a real local Ray runs a job: the job finishes within the
grace period or is requeued, Ray's processes end, and the process exits 0 (not Ray's signal stack dump)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from cloud.devices import DeviceRegistry
from cloud.samples import SqliteSampleStore
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads, newest_job, store_samples
from tests.transport_support import REPO_ROOT

_RAY = {"learners": 1, "num_cpus": 2, "teacher_num_cpus": 0.5, "learner_num_cpus": 0.5, "include_dashboard": False}


def _serve(tmp_path, micro_zoo, epochs: int, grace_s: float) -> tuple[subprocess.Popen, object]:
    data_dir = tmp_path / "data"
    adaptation = adaptation_config(micro_zoo, executor="ray", ray=_RAY, stop_grace_s=grace_s)
    adaptation.akd["epochs"] = epochs
    config_path = tmp_path / "cloud.yaml"
    doc = {"sqlite_synchronous": "NORMAL", "adaptation": adaptation.model_dump(mode="json")}
    config_path.write_text(yaml.safe_dump(doc))
    samples = SqliteSampleStore(data_dir / "samples.db", synchronous="NORMAL")
    devices = DeviceRegistry(data_dir / "devices.db", "NORMAL")
    devices.register("dev-1", cohort="", model_family=FAMILY, model_version="1", capabilities={})
    store_samples(samples, "dev-1", make_uploads(micro_zoo, 24))
    samples.close(), devices.close()
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--config", str(config_path), "--data-dir", str(data_dir)]
    cmd += ["--port", "0", "--log-level", "INFO"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, data_dir / "adaptation" / "jobs.db"


def _wait_job(proc: subprocess.Popen, jobs_db, states: tuple[str, ...], timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = newest_job(jobs_db) if jobs_db.exists() else None
        if job is not None and job.state in states:
            return job
        if proc.poll() is not None:
            raise AssertionError(f"serve exited while waiting for a job {states} (code {proc.returncode})")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for a job {states}")


def _cmdline(p: psutil.Process) -> str:
    """The process's command line ('' for one that exited or is a zombie)."""
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline())
    return ""


def _ray_children(proc: subprocess.Popen, timeout: float = 240.0) -> list[psutil.Process]:
    """Ray's processes under ``serve`` once its raylet runs (Ray starts with the first job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if any("raylet" in _cmdline(k) for k in kids):
            return kids
        time.sleep(0.2)
    raise AssertionError("no raylet under serve")


@pytest.mark.parametrize(
    ("sig", "epochs", "grace_s", "after", "state"),
    [
        (signal.SIGTERM, 400, 1.0, "running", "queued"),  # mid-job, past the grace period: requeued
        # Ray idle after the first job (a fleet run's stop); the other signal. Opt-in: each case starts a Ray.
        pytest.param(signal.SIGINT, 2, 120.0, "done", "done", marks=pytest.mark.slow),
    ],
    ids=["sigterm-mid-job-requeues", "sigint-after-the-first-job"],
)
def test_a_signal_stops_serve_gracefully_under_ray(tmp_path, micro_zoo, sig, epochs, grace_s, after, state):
    proc, jobs_db = _serve(tmp_path, micro_zoo, epochs, grace_s)
    try:
        kids = _ray_children(proc)
        seen = _wait_job(proc, jobs_db, (after,))
        time.sleep(3.0)  # mid-job: the actors run it; after it: Ray sits idle
        proc.send_signal(sig)
        code = proc.wait(grace_s + 90)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "serve.log").read_text()
    assert code == 0, err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
    ours = [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]  # common/logs.py: JSON
    assert any(d["logger"] == "tandem.adaptation" and d["msg"] == "serving role all" for d in ours), ours[:3]
    job = newest_job(jobs_db)
    assert job.job_id == seen.job_id and job.state == state, job
    if state == "queued":  # requeued for the next start, the interrupted attempt not counted against it
        assert job.attempts == 0 and job.error == "service stopped mid-job"
    else:
        assert job.outcome in ("published", "unchanged", "refused")
    _, alive = psutil.wait_procs([k for k in kids if k.is_running()], timeout=120)  # Ray's agents exit late under load
    assert not alive, [_cmdline(k)[:120] for k in alive]
