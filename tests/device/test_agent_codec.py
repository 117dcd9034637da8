"""The agent negotiates the sample format with a real gateway: /2 on a basis the cloud announced, else /1."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from agent_support import QUESTIONS, agent_config, micro_zoo, png_bytes
from transport_support import running_gateway

from cloud.adaptation.config import AdaptationConfig, ModelFamily
from common.feature_basis import fit_basis
from common.sample_codec import decode_sample
from device.agent import DeviceAgent
from device.transport.client import GatewayClient
from sim.zoo.basis import write_basis


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return micro_zoo(tmp_path_factory.mktemp("zoo"))


async def _uploads(tmp_path, zoo, device_basis: str, **overrides) -> list[bytes]:
    """Payloads a registered agent uplinks for three questions, its device model directory carrying a basis that
    is the cloud's (``device_basis='same'``) or one the cloud does not know (``'other'``)."""
    cloud_model = tmp_path / "cloud-model"
    shutil.copytree(zoo.device, cloud_model)
    write_basis(cloud_model, seed=0, samples=8)
    device_model = tmp_path / "device-model"
    shutil.copytree(cloud_model, device_model)
    if device_basis == "other":
        fit_basis(torch.randn(200, 32), parent="x").save(device_model)
    families = {"tandem-zoo": ModelFamily(device_model=str(cloud_model), teacher_model=str(cloud_model))}
    async with running_gateway(tmp_path / "cloud", adaptation=AdaptationConfig(families=families)) as gw:
        cfg = agent_config(tmp_path / "dev", device_model, gw.address, **overrides)
        client = GatewayClient(cfg.transport)
        (await client.register()).save(cfg.state_dir)
        await client.close()
        agent = DeviceAgent(cfg)
        await agent.start()
        try:
            for i, q in enumerate(QUESTIONS):
                await agent.ask(png_bytes(i), q)
            deadline = asyncio.get_running_loop().time() + 20
            while gw.samples.count("dev-1") < len(QUESTIONS):
                assert asyncio.get_running_loop().time() < deadline, "uploads did not arrive"
                await asyncio.sleep(0.02)
            return [s.payload for s in gw.samples.iter_samples("dev-1")]
        finally:
            await agent.stop()


async def test_agent_sends_v2_on_the_announced_basis(zoo, tmp_path):
    payloads = await _uploads(tmp_path, zoo, "same")
    assert all(p[:4] == b"TUS2" for p in payloads)
    assert decode_sample(payloads[0]).features.shape[1] == 32  # the micro tower's width


async def test_agent_falls_back_to_v1_on_an_unannounced_basis_or_when_told(zoo, tmp_path):
    for case, basis, overrides in (("other", "other", {}), ("int8", "same", {"uts.rate.codec": "int8"})):
        payloads = await _uploads(tmp_path / case, zoo, basis, **overrides)
        assert payloads and all(p[:4] != b"TUS2" for p in payloads), case
