"""TransportAgent runs uplink, fetcher and heartbeats together against a gateway."""

from __future__ import annotations

import asyncio

from transport_support import device_config, running_gateway, sample_payload

from device.transport.agent import TransportAgent
from device.transport.client import GatewayClient


async def test_agent_uploads_applies_and_heartbeats(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = device_config(tmp_path / "dev", gw.address, heartbeat_interval_s=0.1)
        client = GatewayClient(cfg)
        (await client.register()).save(cfg.state_dir)
        await client.close()
        applied = []
        agent = TransportAgent(
            cfg,
            lambda payload, header: applied.append(header.target_version),
            status=lambda: ("busy", {"accuracy": 0.75}),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        for i in range(5):
            agent.outbox.put(sample_payload(i, 600))
        gw.publish("dev-1", "v0", "v1", b"delta")
        for _ in range(200):
            if gw.samples.count("dev-1") == 5 and applied and agent.heartbeats >= 2:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        await agent.close()
        record = gw.devices.get("dev-1")
        stored = gw.samples.count("dev-1")
    assert stored == 5 and applied == ["v1"]
    assert record.status == "busy" and record.metrics["accuracy"] == 0.75 and record.applied_version == "v1"
