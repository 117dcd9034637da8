"""The fleet's true-label ceiling: the cloud's jobs replayed from its sample store through the job recipe, with
the world's answers as labels (micro zoo, a real SQLite sample store)."""

from __future__ import annotations

import pytest
import torch

from cloud.adaptation import Teacher
from cloud.adaptation.jobs import Job, SeqRange
from cloud.samples import SqliteSampleStore
from cloud.samples.base import Sample
from common.modeling import load_mllm
from sim.fleet.ceiling import CeilingReplay
from sim.world import World
from tests.cloud.adaptation_support import FAMILY, adaptation_config, make_uploads


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    from sim.zoo.build import ensure_zoo
    from sim.zoo.recipe import micro_recipe

    return ensure_zoo(micro_recipe(), home=tmp_path_factory.mktemp("zoo"), progress=False)


def _job(job_id: int, after: int, upto: int, update_id: int, outcome: str = "published") -> Job:
    return Job(job_id, "device", "cam", FAMILY, (SeqRange("cam", after, upto),), upto - after, 0, "test", "done", 1,
               outcome=outcome, update_id=update_id)  # fmt: skip


def test_replay_runs_the_clouds_jobs_in_order_with_true_labels(micro_zoo, tmp_path):
    cfg = adaptation_config(micro_zoo)
    loaded = load_mllm(micro_zoo.device)
    world = World(0, loaded.model.config.vision_config.image_size)
    store = SqliteSampleStore(tmp_path / "samples.db")
    payloads = make_uploads(micro_zoo, 40, "night", start=100)
    meta = [{"sim_index": str(100 + i), "sim_domain": "night"} for i in range(40)]
    store.put([Sample("cam", 1 + i, p, m) for i, (p, m) in enumerate(zip(payloads, meta, strict=True))])
    teacher = Teacher.load(str(micro_zoo.teacher), "cpu")
    replay = CeilingReplay(cfg, teacher, world, loaded.processor.tokenizer)
    seen = []
    label = replay._label

    def spy(ups, truth):
        seen.append([(u.seq, truth[(u.device_id, u.seq)]) for u in ups])
        return label(ups, truth)

    replay._label = spy
    # Job 3 is listed first but runs last; a skipped job and a job still queued are not replayed.
    jobs = [_job(3, 20, 40, 9), _job(1, 0, 20, 7), _job(2, 20, 40, 0, "skipped")]
    jobs.append(Job(4, "device", "cam", FAMILY, (SeqRange("cam", 0, 40),), 40, 0, "test", "queued", 0))
    states = replay.replay(jobs, store)
    replay.close()
    assert sorted(states) == [7, 9] and (states[7].version, states[9].version) == ("v1", "v2")
    assert not torch.equal(next(iter(states[9].state.values())), next(iter(states[7].state.values())))
    # Held out by seq first (5, 10, ...), then the rest; every label is the world's answer to that frame.
    assert [s for s, _ in seen[0][:4]] == [5, 10, 15, 20] and len(seen) == 2 and len(seen[1]) == 20
    tok = loaded.processor.tokenizer
    for batch in seen:
        for seq, answer in batch:
            assert answer == tok.convert_tokens_to_ids(world.samples(99 + seq, 1, "night")[0].answer)
    store.close()
