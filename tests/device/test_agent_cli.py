"""tandem-device run / status: status of a running agent for a person, and one-line errors for bad input."""

from __future__ import annotations

import asyncio

import pytest
from agent_support import agent_config, micro_zoo, png_bytes

from device.agent import DeviceAgent
from device.agent.service import AgentService
from device.cli import main as device_main


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        device_main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


async def test_status_shows_the_running_agent(zoo, tmp_path, capsys):
    cfg = agent_config(tmp_path / "dev", zoo.device)
    agent = DeviceAgent(cfg, connect=False)
    service = AgentService(agent)
    await service.start()
    try:
        await agent.ask(png_bytes(1), "what colour is the circle?")
        argv = ["status", "--set", f"transport.state_dir={tmp_path / 'dev'}"]
        code, out, err = await asyncio.to_thread(_run, argv, capsys)
    finally:
        await service.stop()
    assert code == 0, err
    assert "adapter" in out and "v0" in out and agent.step.model.adapter.digest()[:12] in out
    assert "SparseVLM on" in out and "answers" in out and "1 (" in out


def test_cli_errors_are_one_line(zoo, tmp_path, capsys):
    bad = tmp_path / "device.yaml"
    bad.write_text("api:\n  max_batchh: 4\n")
    code, _, err = _run(["run", "--config", str(bad)], capsys)
    assert code == 1 and "api.max_batchh" in err and len(err.strip().splitlines()) == 1
    state = tmp_path / "unregistered"
    code, _, err = _run(["run", "--state-dir", str(state), "--model", str(zoo.device), "--listen", ""], capsys)
    assert code == 1 and "tandem-device register" in err
    code, _, err = _run(["run", "--set", "api.max_batch"], capsys)
    assert code == 1 and "section.field=value" in err
    code, _, err = _run(["status", "--listen", "127.0.0.1:1", "--timeout", "1"], capsys)
    assert code == 1 and "no agent answers on 127.0.0.1:1" in err
    code, _, err = _run(["run", "--offline", "--state-dir", str(tmp_path / "s"), "--model", str(tmp_path)], capsys)
    assert code == 1 and "not a model directory" in err
