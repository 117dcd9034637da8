"""The service on a local Ray (num_cpus=2, one instance per session) behind a real gateway on 127.0.0.1:
uploads in -> job on a learner actor -> signed update -> the device fetches and applies it (digest == mirror);
a learner actor killed mid-job -> the job is retried on a fresh actor and completes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from cloud.adaptation.runtime import build_trainer
from cloud.adaptation.state import LearnerStore
from cloud.akd import build_student
from cloud.akd.student import adapter_state
from common.modeling import load_mllm
from device.transport.fetcher import UpdateFetcher
from device.transport.outbox import OutboxItem
from device.update_apply import VersionedAdapter, apply_adapter_update
from protocol.updates import header_from_proto
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads
from tests.transport_support import gateway_config, registered_client


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(600)
async def test_uploads_become_a_signed_update_the_device_applies(tmp_path, micro_zoo, local_ray, ray_fault_file):
    from cloud.gateway import GatewayServer

    adaptation = adaptation_config(
        micro_zoo, executor="ray", ray={"learners": 1, "teacher_num_cpus": 0.5, "learner_num_cpus": 0.5}
    )
    gateway = GatewayServer(gateway_config(tmp_path / "data", adaptation=adaptation))
    await gateway.start()
    trainer = await asyncio.to_thread(build_trainer, gateway.config, gateway)
    halt = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(halt,), daemon=True)
    thread.start()
    uploads = make_uploads(micro_zoo, 48)
    try:
        # Device 1: uploads through the real gateway; its job runs on a learner actor.
        async with registered_client(tmp_path / "dev1", gateway.address, "dev-1", model_family=FAMILY) as client:
            resp = await client.upload([OutboxItem(i + 1, p) for i, p in enumerate(uploads[:24])])
            assert resp.acked_seq == 24
            await asyncio.to_thread(  # done, not only published: the service marks the job done after publishing
                _wait, lambda: _done(trainer, "dev-1"), 300, "dev-1's job to be done"
            )
            (job,) = trainer.jobs.list(subject="dev-1")
            assert job.outcome == "published" and job.attempts == 1 and job.samples == 24
            # The device fetches, verifies the signature and applies it on top of its seeded v0 adapters.
            model = load_mllm(micro_zoo.device).model
            v0 = adapter_state(build_student(model, adaptation.akd_config().adapter))
            held = {"adapter": VersionedAdapter("v0", v0)}

            def apply(payload, header):
                held["adapter"] = apply_adapter_update(held["adapter"], payload, header_from_proto(header))

            fetcher = UpdateFetcher(client, client.identity, client.config, apply)
            outcomes = await fetcher.sync_once()
            assert [o.applied for o in outcomes] == [True] and fetcher.current_version == "v1"
            mirror = LearnerStore(gateway.config.adaptation_dir).current("device:dev-1")
            assert held["adapter"].version == mirror["mirror_version"] == "v1"
            assert held["adapter"].digest() == mirror["mirror_digest"]

        # Device 2: its learner actor is killed mid-job; the job is retried on a fresh actor and completes. A test
        # fault point holds the job at its training round until the kill (common/faults.py), however fast the job.
        held = Path(f"{ray_fault_file}.held")
        ray_fault_file.write_text("hold:cloud.job_round")
        async with registered_client(tmp_path / "dev2", gateway.address, "dev-2", model_family=FAMILY) as client:
            await client.upload([OutboxItem(i + 1, p) for i, p in enumerate(uploads[24:48])])
            await asyncio.to_thread(_wait, held.exists, 120, "dev-2's job to reach its round")
            (job,) = trainer.jobs.list(subject="dev-2")
            actor = trainer.executor.running_actor(job.job_id)
            assert job.state == "running" and actor is not None
            point, pid = held.read_text().split()
            assert point == "cloud.job_round" and _alive(int(pid))
            local_ray.kill(actor, no_restart=True)
            await asyncio.to_thread(_wait, lambda: not _alive(int(pid)), 60, "the held actor's process to die")
            ray_fault_file.unlink()  # the retry runs through
            await asyncio.to_thread(
                _wait, lambda: _done(trainer, "dev-2"), 300, "dev-2's job to be done after the kill"
            )
            (job,) = trainer.jobs.list(subject="dev-2")
            assert job.state == "done" and job.attempts == 2 and "actor died" in job.error
            assert len(gateway.updates.list(device_id="dev-2")) == 1
            assert trainer.metrics.actor_restarts._value.get() == 1
            assert job.result["gpu_bytes_after"] == 0  # CPU here; on a GPU the actor reports what it still holds
    finally:
        ray_fault_file.unlink(missing_ok=True)  # never leave a point armed for the session's other Ray tests
        halt.set()
        await asyncio.to_thread(thread.join, 60)
        trainer.close()
        await gateway.stop(grace=0.2)


def _done(trainer, device_id: str) -> bool:
    jobs = trainer.jobs.list(subject=device_id)
    return bool(jobs) and jobs[0].state == "done"
