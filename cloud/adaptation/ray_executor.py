"""The Ray executor: one teacher actor per model family and a pool of learner actors on fractional GPUs.

Learner actors keep only the device base models between jobs; each job's learner is restored from the state
directory (shared storage on a cluster), so a job whose actor died is simply requeued and rerun on a fresh
actor. ``ray.init()`` starts a local Ray sized to the machine unless an address (or RAY_ADDRESS) is given;
a Ray that is already initialised in this process (tests) is used as is and left running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError

from cloud.adaptation.config import AdaptationConfig
from cloud.adaptation.executor import Executor, Finished, WorkerLost
from cloud.adaptation.teacher import Teacher
from cloud.adaptation.worker import JobSpec, Worker
from cloud.akd import TeacherLabels
from cloud.feature_bases import load_known_bases
from common.sample_codec import UploadSample, decode_sample


def _config(doc: dict) -> AdaptationConfig:
    return AdaptationConfig.model_validate(doc)


@ray.remote
class TeacherActor:
    """Holds one family's teacher; labels batches of uploaded payloads."""

    def __init__(self, config_doc: dict, family: str, threads: int) -> None:
        torch.set_num_threads(threads)
        cfg = _config(config_doc)
        load_known_bases(cfg)  # format /2 uploads decode on these
        fam = cfg.families[family]
        self.teacher = Teacher.load(fam.teacher_model, cfg.device, cfg.label_batch_size, fam.answer_tokens())

    def hidden_size(self) -> int:
        return self.teacher.hidden_size

    def label(self, payloads: list[bytes]) -> TeacherLabels:
        return self.teacher.label([decode_sample(p) for p in payloads])


class RayLabeler:
    """The Labeler a learner actor uses: calls the family's teacher actor."""

    def __init__(self, teachers: dict) -> None:
        self.teachers = teachers
        self._hidden: dict[str, int] = {}

    def hidden_size(self, family: str) -> int:
        if family not in self._hidden:
            self._hidden[family] = ray.get(self.teachers[family].hidden_size.remote())
        return self._hidden[family]

    def label(self, family: str, payloads: list[bytes], samples: list[UploadSample]) -> TeacherLabels:
        return ray.get(self.teachers[family].label.remote(list(payloads)))


@ray.remote
class LearnerActor:
    """Runs jobs with a ``Worker`` whose labels come from the teacher actors."""

    def __init__(self, config_doc: dict, state_dir: str, teachers: dict, threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker = Worker(_config(config_doc), state_dir, RayLabeler(teachers))

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: JobSpec):
        result = self.worker.run(spec)
        gpu = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        result.summary["gpu_bytes_after"] = int(gpu)
        return result


class RayExecutor(Executor):
    """Dispatches jobs to idle learner actors; a dead actor is replaced and its job reported lost."""

    def __init__(self, config: AdaptationConfig, state_dir: str | Path) -> None:
        self.config = config
        self.state_dir = str(state_dir)
        self._doc = config.model_dump(mode="json")
        self.owns_ray = False
        self.has_gpu = False
        self.teachers: dict = {}
        self.actors: list = []
        self.idle: list = []
        self._running: dict = {}
        self.restarts = 0
        self.started = False

    def start(self) -> None:
        """Join or start Ray and create the actors (on the first job, so an idle service holds nothing)."""
        if self.started:
            return
        rc = self.config.ray
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            address = rc.address or os.environ.get("RAY_ADDRESS")
            kwargs = {"include_dashboard": rc.include_dashboard}
            if address is None and rc.num_cpus is not None:
                kwargs["num_cpus"] = rc.num_cpus
            ray.init(address=address, **kwargs)
        self.has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.teachers = {
            name: TeacherActor.options(
                num_gpus=rc.teacher_num_gpus if self.has_gpu else 0, num_cpus=rc.teacher_num_cpus
            ).remote(self._doc, name, rc.torch_threads)
            for name in self.config.families
        }
        self.actors = [self._new_actor() for _ in range(rc.learners)]
        self.idle = list(self.actors)
        self.started = True
        if self.on_start is not None:
            self.on_start()

    def _new_actor(self):
        rc = self.config.ray
        return LearnerActor.options(
            num_gpus=rc.learner_num_gpus if self.has_gpu else 0, num_cpus=rc.learner_num_cpus
        ).remote(self._doc, self.state_dir, self.teachers, rc.torch_threads)

    def free_slots(self) -> int:
        return len(self.idle) if self.started else self.config.ray.learners

    def submit(self, spec: JobSpec) -> None:
        self.start()
        actor = self.idle.pop(0)
        self._running[actor.run.remote(spec)] = (spec, actor, time.perf_counter())

    def running(self) -> list[int]:
        return [spec.job_id for spec, _, _ in self._running.values()]

    def running_actor(self, job_id: int):
        """The actor handle running ``job_id`` (None when it is not running)."""
        for spec, actor, _ in self._running.values():
            if spec.job_id == job_id:
                return actor
        return None

    def poll(self, timeout: float) -> list[Finished]:
        if not self._running:
            return []
        ready, _ = ray.wait(list(self._running), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            spec, actor, start = self._running.pop(ref)
            try:
                out.append(Finished(spec, ray.get(ref), None, time.perf_counter() - start))
                self.idle.append(actor)
            except RayActorError as exc:
                self._replace(actor)
                out.append(Finished(spec, None, WorkerLost(f"learner actor died: {type(exc).__name__}"), 0.0))
            except Exception as exc:  # the job's own error, raised inside the actor
                self.idle.append(actor)
                out.append(Finished(spec, None, getattr(exc, "cause", None) or exc, time.perf_counter() - start))
        return out

    def _replace(self, actor) -> None:
        ray.kill(actor, no_restart=True)
        fresh = self._new_actor()
        self.actors = [fresh if a is actor else a for a in self.actors]
        self.idle.append(fresh)
        self.restarts += 1

    def close(self) -> None:
        for actor in [*self.actors, *self.teachers.values()]:
            ray.kill(actor, no_restart=True)
        self.actors, self.idle, self._running, self.teachers = [], [], {}, {}
        if self.owns_ray:
            ray.shutdown()
        self.started = False
