"""Multi-token answers: greedy generation, teacher-forced logits, sequence scores, Ask over gRPC and the CLI."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from agent_support import agent_config, micro_zoo, png_bytes
from transport_support import running_gateway

from common.llava_tokens import answer_forward
from device.agent import DeviceAgent, DeviceModel
from device.agent.service import AgentService
from device.cli import main as device_main
from device.uts import answer_uncertainty

QUESTION = "what color is the circle ?"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def model(zoo):
    return DeviceModel.load(zoo.device)


def _features(model: DeviceModel, n: int) -> torch.Tensor:
    from agent_support import image_array

    return model.features([image_array(i) for i in range(n)])


def test_sequence_scores_count_only_each_rows_tokens():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 0, 0] = logits[0, 1, 1] = 10.0  # row 0: two sure tokens, a third masked out
    logits[0, 2] = 0.0  # uniform, but masked
    logits[1, :, 2] = 10.0
    logits[1, 1, 3] = 10.0  # row 1's second token: a tie between two ids (margin 0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    u = answer_uncertainty(logits, mask=mask)
    assert u.margin[0] > 0.99 and u.margin[1] < 1e-6
    assert u.entropy[0] < 1e-3 and u.entropy[1] > 0.1
    assert u.token_confidence[0, 2] == 1.0 and math.isclose(float(u.confidence[1]), float(u.token_confidence[1].prod()))
    unmasked = answer_uncertainty(logits)
    assert unmasked.entropy[0] > u.entropy[0]  # the uniform token counts without the mask
    with pytest.raises(ValueError, match="a token in every row"):
        answer_uncertainty(logits, mask=torch.zeros(2, 3, dtype=torch.bool))


def test_teacher_forced_logits_equal_step_by_step_logits(model):
    feats = list(_features(model, 2))
    questions = [QUESTION, "how many shapes are there ?"]
    forced = [[7, 9, 11], [5]]
    out = answer_forward(model.model, model.prompts, feats, questions, continuation=forced)
    assert out.step_logits.shape[:2] == (2, 4)
    for i, seq in enumerate(forced):
        for t in range(len(seq) + 1):
            alone = answer_forward(model.model, model.prompts, [feats[i]], [questions[i]], continuation=[seq[:t]])
            torch.testing.assert_close(out.step_logits[i, t], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_and_stops_at_its_limit(model):
    feats = _features(model, 3)
    questions = [QUESTION] * 3
    first = model.forward(feats, questions)
    out = model.generate(feats, questions, [1, 3, 5])
    assert [len(s) for s in out.sequences] == [1, min(3, len(out.sequences[1])), len(out.sequences[2])]
    assert all(len(s) <= lim for s, lim in zip(out.sequences, [1, 3, 5], strict=True))
    assert [s[0] for s in out.sequences] == first.logits.argmax(-1).tolist()
    for i, seq in enumerate(out.sequences):  # each next token is the argmax after the ones before it
        for t in range(1, len(seq)):
            step = answer_forward(model.model, model.prompts, [feats[i]], [questions[i]], continuation=[seq[:t]])
            assert int(step.logits.argmax(-1)) == seq[t]
        assert seq[-1] == model.eos_id or len(seq) == [1, 3, 5][i]


async def test_ask_returns_text_and_token_confidences(zoo, tmp_path):
    agent = DeviceAgent(agent_config(tmp_path / "dev", zoo.device, **{"sparse.enabled": False}), connect=False)
    await agent.start()
    try:
        one = await agent.ask(png_bytes(1), QUESTION)
        many = await agent.ask(png_bytes(1), QUESTION, max_new_tokens=4)
    finally:
        await agent.stop()
    assert len(one.tokens) == 1 and one.tokens[0] == one.answer  # the zoo's one-word answers stay 1 token
    assert many.tokens[0] == one.answer and 1 <= len(many.tokens) <= 4
    assert len(many.token_confidences) == len(many.tokens)
    assert math.isclose(many.confidence, math.prod(many.token_confidences), rel_tol=1e-5)
    assert 0.0 <= many.uncertainty["margin"] <= 1.0


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        device_main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


async def test_cli_ask_against_a_running_agent(zoo, tmp_path, capsys):
    state = tmp_path / "dev"
    service = AgentService(DeviceAgent(agent_config(state, zoo.device), connect=False))
    image = tmp_path / "frame.png"
    image.write_bytes(png_bytes(3))
    await service.start()
    try:
        where = ["--set", f"transport.state_dir={state}"]
        code, out, err = await asyncio.to_thread(_run, ["ask", "--image", str(image), QUESTION, *where], capsys)
        assert code == 0, err
        assert "confidence" in out and "1 token(s)" in out
        argv = ["ask", "--image", str(image), QUESTION, "--json", "--max-new-tokens", "3", *where]
        code, out, err = await asyncio.to_thread(_run, argv, capsys)
        assert code == 0, err
        reply = json.loads(out)
        assert 1 <= len(reply["tokens"]) <= 3 and len(reply["token_confidences"]) == len(reply["tokens"])
        assert reply["visual_tokens_total"] == 16 and reply["adapter_version"] == "v0"
        code, _, err = await asyncio.to_thread(_run, ["ask", "--image", str(image), "  ", *where], capsys)
        assert code == 1 and "INVALID_ARGUMENT: question is empty" in err and len(err.strip().splitlines()) == 1
        argv = ["ask", "--image", str(image), QUESTION, "--max-new-tokens", "100000", *where]
        code, _, err = await asyncio.to_thread(_run, argv, capsys)
        assert code == 1 and "max_new_tokens 100000 exceeds 256" in err
    finally:
        await service.stop()
    code, _, err = await asyncio.to_thread(_run, ["ask", "--image", str(tmp_path / "none.png"), QUESTION], capsys)
    assert code == 1 and "image file not found" in err
    argv = ["ask", "--image", str(image), QUESTION, "--listen", "127.0.0.1:1", "--timeout", "1"]
    code, _, err = await asyncio.to_thread(_run, argv, capsys)
    assert code == 1 and "no agent answers on 127.0.0.1:1" in err


async def test_register_with_an_enrollment_code(tmp_path, capsys):
    async with running_gateway(tmp_path / "cloud", open_enrollment=False, enrollment_secret="s3cret") as gw:
        base = ["register", "--gateway", gw.address, "--device-id", "cam-1", "--state-dir", str(tmp_path / "d")]
        code, _, err = await asyncio.to_thread(_run, [*base, "--timeout", "5"], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1
        code, _, err = await asyncio.to_thread(_run, [*base, "--enrollment-code", "wrong", "--timeout", "5"], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1
        code, out, err = await asyncio.to_thread(_run, [*base, "--enrollment-code", "s3cret"], capsys)
        assert code == 0 and "registered cam-1" in out, err
    argv = [*base[:-2], "--state-dir", str(tmp_path / "e"), "--enrollment-code", " "]
    code, _, err = await asyncio.to_thread(_run, argv, capsys)
    assert code == 1 and "--enrollment-code is empty" in err


@pytest.mark.parametrize("sparse", [None, {"budget": 8}], ids=["dense", "sparsevlm"])
def test_cached_answers_equal_uncached_ones(model, sparse):
    """One prefill + cached steps answers exactly as re-running the prefill per token (rows of different prompt
    lengths in one batch on the dense path; SparseVLM: its pruned cache, one row at a time)."""
    from device.sparse import SparseConfig

    feats = list(_features(model, 2))
    questions = [QUESTION, "is there a red square in the image ?"]
    model.set_sparse(SparseConfig(**sparse) if sparse else None)
    model.eos_id, eos = -1, model.eos_id  # full-length answers: every step is compared
    try:
        rows = [[0, 1]] if sparse is None else [[0], [1]]
        for idx in rows:
            f, q = [feats[i] for i in idx], [questions[i] for i in idx]
            cached = model.generate(f, q, [6] * len(idx))
            uncached = model.generate(f, q, [6] * len(idx), use_cache=False)
            assert cached.sequences == uncached.sequences and all(len(s) == 6 for s in cached.sequences)
            torch.testing.assert_close(cached.token_logits, uncached.token_logits, rtol=1e-4, atol=1e-4)
            if sparse:
                assert cached.kept[0] < cached.total[0]
    finally:
        model.eos_id = eos
        model.set_sparse(None)
