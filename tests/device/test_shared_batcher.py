"""Many agents, one batcher: batched forwards across agents answer exactly as each agent alone, each row with its
own agent's adapter, and each agent's modelled device paces only its own answers (micro zoo, offline agents)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from agent_support import QUESTIONS, agent_config, micro_zoo, png_bytes

from device.agent import AdapterState, DeviceAgent, DeviceModel
from device.agent.shared_batcher import SharedBatcher
from device.agent.tenants import TenantModels

AGENTS = 3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


def _adapter(model, k: int) -> AdapterState:
    """Agent ``k``'s own adapter: version 0 moved by a seeded step (k = 0 keeps version 0)."""
    gen = torch.Generator().manual_seed(k)
    state = {n: w + (0.4 * k) * torch.randn(w.shape, generator=gen) for n, w in model.adapter_weights().items()}
    return AdapterState(f"v{k}", state)


def _cfg(tmp_path, zoo, k: int):
    return agent_config(tmp_path / f"dev{k}", zoo.device, **{"transport.device_id": f"dev-{k}", "api.listen": ""})


async def _ask_all(agents: list[DeviceAgent], rounds: int):
    """Every agent asks ``rounds`` frames at once (all agents concurrently); answers per agent, in order."""
    jobs = [agent.ask(png_bytes(10 * k + r), QUESTIONS[r % len(QUESTIONS)]) for r in range(rounds)
            for k, agent in enumerate(agents)]  # fmt: skip
    answers = await asyncio.gather(*jobs)
    return [[answers[r * len(agents) + k] for r in range(rounds)] for k in range(len(agents))]


async def test_shared_forwards_answer_as_each_agent_alone(zoo, tmp_path):
    shared = DeviceModel.load(zoo.device, sparse=_cfg(tmp_path, zoo, 0).sparse)
    tenants = TenantModels(shared)
    pool = SharedBatcher(tenants, max_batch=16, max_wait_s=0.05)
    pooled = [
        DeviceAgent(_cfg(tmp_path / "pool", zoo, k), tenants.tenant(f"dev-{k}"), connect=False, shared_batcher=pool)
        for k in range(AGENTS)
    ]
    for k, agent in enumerate(pooled):
        agent.step.swap(_adapter(agent.model, k))
    alone = [DeviceAgent(_cfg(tmp_path / "alone", zoo, k), connect=False) for k in range(AGENTS)]
    for k, agent in enumerate(alone):
        agent.step.swap(_adapter(agent.model, k))
    for agent in pooled + alone:
        await agent.start()
    try:
        got = await _ask_all(pooled, rounds=4)
        want = await _ask_all(alone, rounds=4)
    finally:
        for agent in pooled + alone:
            await agent.stop()
    assert pool.rows == AGENTS * 4 and pool.batches < AGENTS * 4  # rows of several agents shared forwards
    for k in range(AGENTS):
        assert [a.version for a in got[k]] == [f"v{k}"] * 4
        assert [a.token_ids for a in got[k]] == [a.token_ids for a in want[k]]
        for g, w in zip(got[k], want[k], strict=True):
            assert g.confidence == pytest.approx(w.confidence, abs=1e-5)
            assert g.kept_tokens == w.kept_tokens and g.sent == w.sent
    confidences = {round(got[k][0].confidence, 4) for k in range(AGENTS)}
    assert len(confidences) == AGENTS  # the agents' adapters differ, so the same kind of frame scores differently


async def test_a_swap_changes_only_its_own_agent(zoo, tmp_path):
    tenants = TenantModels(DeviceModel.load(zoo.device))
    pool = SharedBatcher(tenants)
    agents = [
        DeviceAgent(_cfg(tmp_path, zoo, k), tenants.tenant(f"dev-{k}"), connect=False, shared_batcher=pool)
        for k in range(2)
    ]
    for agent in agents:
        await agent.start()
    try:
        before = await _ask_all(agents, rounds=2)
        moved = _adapter(agents[1].model, 3)
        await asyncio.wrap_future(agents[1].batcher.between_batches(lambda: agents[1].step.swap(moved)))
        after = await _ask_all(agents, rounds=2)
    finally:
        for agent in agents:
            await agent.stop()
    assert [a.version for a in after[1]] == ["v3", "v3"] and [a.version for a in after[0]] == ["v0", "v0"]
    assert [a.confidence for a in after[0]] == pytest.approx([a.confidence for a in before[0]], abs=1e-6)
    assert [a.confidence for a in after[1]] != pytest.approx([a.confidence for a in before[1]], abs=1e-6)


async def test_each_lane_is_paced_by_its_own_modelled_device(zoo, tmp_path):
    tenants = TenantModels(DeviceModel.load(zoo.device))
    pool = SharedBatcher(tenants, max_wait_s=0.2)
    slow = DeviceAgent(
        _cfg(tmp_path, zoo, 0), tenants.tenant("slow"), connect=False, shared_batcher=pool,
        compute_model=lambda n, measured: 2.0,
    )  # fmt: skip
    fast = DeviceAgent(
        _cfg(tmp_path, zoo, 1), tenants.tenant("fast"), connect=False, shared_batcher=pool,
        compute_model=lambda n, measured: 0.05,
    )  # fmt: skip
    finished: list[str] = []

    async def ask(agent, name):
        answer = await agent.ask(png_bytes(1), QUESTIONS[0])
        finished.append(name)
        return answer

    for agent in (slow, fast):
        await agent.start()
    try:
        a_slow, a_fast = await asyncio.gather(ask(slow, "slow"), ask(fast, "fast"))
        second = await ask(slow, "slow")  # waits for the slow device's first batch to finish, then its own 2 s
    finally:
        for agent in (slow, fast):
            await agent.stop()
    assert finished[:2] == ["fast", "slow"]  # the fast device's answer did not wait for the slow one's compute
    assert a_slow.latency_s >= 2.0 and a_fast.latency_s < a_slow.latency_s - 1.5
    assert second.latency_s >= 2.0


def test_adapter_slots_are_separate_and_checked(zoo):
    model = DeviceModel.load(zoo.device)
    v0 = model.adapter_weights()
    model.add_slot("tenant_a")
    with pytest.raises(ValueError, match="exists"):
        model.add_slot("tenant_a")
    moved = _adapter(model, 2)
    model.install(moved, "tenant_a")
    assert all(torch.equal(model.adapter_weights("tenant_a")[k], moved.state[k]) for k in v0)
    assert all(torch.equal(model.adapter_weights()[k], v0[k]) for k in v0)  # the default slot is untouched
    wrong = AdapterState("v9", {**moved.state, "base_model.model.extra.lora_A.weight": torch.zeros(1)})
    with pytest.raises(Exception, match="does not fit slot"):
        model.install(wrong, "tenant_a")
    with pytest.raises(Exception, match="no adapter slot"):
        model.install(moved, "tenant_b")
