"""The true-label ceiling of a fleet run, measured after the run from what the cloud stored.

Every job the cloud ran is replayed in job order, per subject (device or cohort), on the very samples it read
(same seqs, same tokens: the sample store's payloads) through the trainer's job recipe
(``cloud.adaptation.recipe.run_job``, a learner built by the trainer's ``Worker``) with the cloud's AKD, DWC,
gate and replay settings, but with the world's answers as labels. A point's ceiling is the accuracy, on the same
held-out samples, of the ceiling learner's state after the job that published the version the device served
then (before any update: the initial adapters). DWC budgets are the config's (``link.budget_bytes``, else
``link.max_bytes``, else DWC's own): budgets the service derived from a device's reported downlink are not
replayed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import cache

import torch

from cloud.adaptation import (
    AdaptationConfig,
    JobSettings,
    Teacher,
    Upload,
    Worker,
    commit_update,
    decode_uploads,
    feature_dim,
    read_raw,
    run_job,
)
from cloud.akd import TeacherLabels
from device.agent import AdapterState
from sim.experiment.truth import true_labels
from sim.fleet.evaluate import Evaluator
from sim.fleet.results import FleetResult
from sim.world import World

log = logging.getLogger("tandem.sim.fleet")


class _TeacherHidden:
    """The worker's labeler, used only for the teacher's hidden size (labels come from ``CeilingReplay``)."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher

    def hidden_size(self, family: str) -> int:
        return self.teacher.hidden_size

    def label(self, family: str, payloads, samples) -> TeacherLabels:  # pragma: no cover - never called
        raise NotImplementedError("the ceiling labels uploads with the world's answers")


class CeilingReplay:
    """Replays a run's jobs with true labels; ``states`` maps update id -> the ceiling's adapters after that job."""

    def __init__(self, config: AdaptationConfig, teacher: Teacher, world: World, tokenizer) -> None:
        self.config = config
        self.teacher = teacher
        self.world = world
        self.tokenizer = tokenizer
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-ceiling-")
        self.worker = Worker(config, self._tmp.name, _TeacherHidden(teacher))
        gate, link = config.gate, config.link
        budget = link.budget_bytes if link.budget_bytes is not None else link.max_bytes
        self.settings = JobSettings(gate.held_out_every, gate.margin, gate.min_held_out, budget)

    @cache  # noqa: B019 - one replay object per run
    def answer_id(self, index: int, domain: str) -> int:
        """The world's answer to stream sample ``index`` shown in ``domain``, as a token id."""
        return int(self.tokenizer.convert_tokens_to_ids(self.world.samples(index, 1, domain)[0].answer))

    def replay(self, jobs: Sequence, samples) -> dict[int, AdapterState]:
        """``jobs``: the cloud's done jobs (``cloud.adaptation.Job``); ``samples``: its sample store."""
        states: dict[int, AdapterState] = {}
        learners = {}
        for job in sorted(jobs, key=lambda j: j.job_id):
            if job.state != "done" or job.outcome == "skipped":
                continue
            if job.key not in learners:
                learners[job.key] = self.worker.build_learner(job.family)
            learner = learners[job.key]
            rows = read_raw(samples, job.ranges, self.config.max_samples_per_job)
            truth = {(d, s): self.answer_id(int(m["sim_index"]), m["sim_domain"]) for d, s, _, m in rows}
            decoded = decode_uploads(rows, job.family, feature_dim(learner.trainer.student))
            done = run_job(learner, decoded, lambda ups, t=truth: self._label(ups, t), self.settings)
            if done.update is not None:
                commit_update(learner, done.update)
            if job.update_id:
                states[job.update_id] = AdapterState(learner.mirror.version, learner.mirror.state)
        return states

    def _label(self, uploads: Sequence[Upload], truth: dict[tuple[str, int], int]) -> TeacherLabels:
        answers = torch.tensor([truth[(u.device_id, u.seq)] for u in uploads], dtype=torch.long)
        return true_labels(self.teacher.label([u.sample for u in uploads]), answers)

    def close(self) -> None:
        self._tmp.cleanup()


def add_ceiling(
    result: FleetResult, served: dict[str, dict[str, int]], states: dict[int, AdapterState], evaluator: Evaluator
) -> None:
    """Fill each point's ``ceiling``: ``served`` maps device id -> version -> the update id that brought it."""
    for d in result.devices:
        updates = served.get(d.device_id, {})
        for p in d.points:
            update_id = updates.get(p.version)
            state = states.get(update_id) if update_id is not None else None
            if state is None and update_id is not None:
                continue  # the version came from a job the replay could not run: no ceiling for it
            p.ceiling = evaluator.accuracy(state or evaluator.initial, p.domain)


def served_versions(devices) -> dict[str, dict[str, int]]:
    """Device id -> version -> update id, from what each device's probe saw it apply."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for d in devices:
        for a in d.probe.data.applied:
            if a.update_id is not None:
                out[d.spec.device_id][a.version] = a.update_id
    return dict(out)


def measure_ceiling(result: FleetResult, devices, cloud, teacher_model, teacher_prompts, world, evaluator) -> None:
    """After the run (the cloud stopped): replay the cloud's jobs with true labels and fill every point's
    ``ceiling``; a failure is logged and recorded in ``result.facts`` (the run's other figures stand)."""
    from cloud.stores import open_job_store, open_sample_store

    started = time.perf_counter()
    replay = None
    try:
        cfg = cloud.gateway_config()
        samples = open_sample_store(cfg, cfg.data_dir, cfg.sqlite_synchronous)
        jobs = open_job_store(cfg, cfg.adaptation_dir, cfg.sqlite_synchronous)
        try:
            teacher = Teacher(teacher_model, teacher_prompts)
            replay = CeilingReplay(cfg.adaptation, teacher, world, evaluator.model.tokenizer)
            states = replay.replay(jobs.list(limit=1_000_000), samples)
        finally:
            samples.close()
            jobs.close()
        add_ceiling(result, served_versions(devices), states, evaluator)
        result.facts["ceiling_s"] = time.perf_counter() - started
    except Exception as exc:  # reported; the run's other figures still stand
        log.exception("could not measure the true-label ceiling")
        result.facts["ceiling_error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        if replay is not None:
            replay.close()
