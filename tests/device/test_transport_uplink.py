"""Uplink worker through the link emulator: cuts and outages, every sample stored exactly once."""

from __future__ import annotations

import asyncio

import torch
from transport_support import device_config, running_gateway, sample_payload

from common.sample_codec import UploadSample, encode_sample
from device.transport.client import GatewayClient
from device.transport.outbox import Outbox
from device.transport.uplink import UplinkWorker
from sim.link import LinkConfig, LinkProxy


async def test_uplink_survives_cuts_without_duplicates(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        async with LinkProxy("127.0.0.1", gw.port, LinkConfig(up_mbps=40, latency_ms=5)) as proxy:
            cfg = device_config(tmp_path / "dev", proxy.address, batch_max_samples=8)
            client = GatewayClient(cfg)
            identity = await client.register()
            box = Outbox(tmp_path / "dev" / "outbox.db")
            sent = [sample_payload(i, 100_000) for i in range(40)]
            payloads = {box.put(sent[i], {"i": str(i)}): i for i in range(40)}
            worker = UplinkWorker(client, box, cfg)

            async def cutter():  # cut the link mid-upload twice, wherever the upload has got to
                for threshold in (300_000, 2_000_000):
                    while proxy.stats.bytes_up < threshold:
                        await asyncio.sleep(0.005)
                    proxy.cut_all()

            cuts = asyncio.create_task(cutter())
            acked = await asyncio.wait_for(worker.push_all(), timeout=60)
            await asyncio.wait_for(cuts, timeout=5)
            cut_count = proxy.stats.cuts
            await client.close()
        assert cut_count == 2
        assert acked == 40 and box.stats().pending == 0
        assert worker.stats.attempts_failed >= 2  # each cut interrupted an upload and it was resent
        stored = list(gw.samples.iter_samples(identity.device_id))
        assert [s.seq for s in stored] == sorted(payloads)
        assert all(s.payload == sent[payloads[s.seq]] for s in stored)


async def test_uplink_waits_out_an_outage(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw, LinkProxy("127.0.0.1", gw.port) as proxy:
        cfg = device_config(tmp_path / "dev", proxy.address)
        client = GatewayClient(cfg)
        await client.register()
        box = Outbox(tmp_path / "dev" / "outbox.db")
        for i in range(5):
            box.put(sample_payload(i, 500))
        proxy.set_down(True)
        worker = UplinkWorker(client, box, cfg)
        push = asyncio.create_task(worker.push_all())
        await asyncio.sleep(0.5)
        assert not push.done() and gw.samples.count() == 0
        proxy.set_down(False)
        assert await asyncio.wait_for(push, timeout=20) == 5
        assert worker.stats.attempts_failed >= 1
        assert gw.samples.count("dev-1") == 5
        await client.close()


async def test_run_loop_drains_new_samples(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = device_config(tmp_path / "dev", gw.address)
        client = GatewayClient(cfg)
        await client.register()
        box = Outbox(tmp_path / "dev" / "outbox.db")
        stop = asyncio.Event()
        task = asyncio.create_task(UplinkWorker(client, box, cfg).run(stop))
        for i in range(3):
            box.put(sample_payload(i, 500))
            await asyncio.sleep(0.05)
        for _ in range(100):
            if gw.samples.count("dev-1") == 3:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        assert gw.samples.count("dev-1") == 3 and box.stats().pending == 0
        await client.close()


def _zero_sample() -> bytes:
    """A valid, very compressible sample of about 200 kB (all features zero)."""
    k = 3000
    return encode_sample(
        UploadSample(torch.zeros(k, 64), torch.arange(k), k, "q ?", torch.tensor([1]), torch.tensor([0.5]))
    )


async def test_gzip_compression_shrinks_compressible_uploads(tmp_path):
    sizes = {}
    zero = _zero_sample()
    for mode in ("none", "gzip"):
        gateway = running_gateway(tmp_path / f"cloud-{mode}")
        async with gateway as gw, LinkProxy("127.0.0.1", gw.port) as proxy:
            cfg = device_config(tmp_path / f"dev-{mode}", proxy.address, compression=mode)
            client = GatewayClient(cfg)
            await client.register()
            box = Outbox(tmp_path / f"dev-{mode}" / "outbox.db")
            for _ in range(4):
                box.put(zero)
            await UplinkWorker(client, box, cfg).push_all()
            await client.close()
            sizes[mode] = proxy.stats.bytes_up
            assert [s.payload for s in gw.samples.iter_samples("dev-1")] == [zero] * 4
    assert sizes["gzip"] < sizes["none"] / 10


async def test_sample_refused_for_its_content_is_set_aside(tmp_path):
    import sqlite3

    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = device_config(tmp_path / "dev", gw.address)
        client = GatewayClient(cfg)
        await client.register()
        box = Outbox(tmp_path / "dev" / "outbox.db")
        for i in range(6):
            box.put(sample_payload(i, 1000))
        with sqlite3.connect(tmp_path / "dev" / "outbox.db") as db:  # bit rot in the stored digest of seq 3
            db.execute("UPDATE outbox SET sha256 = zeroblob(32) WHERE seq = 3")
        worker = UplinkWorker(client, box, cfg)
        assert await asyncio.wait_for(worker.push_all(), timeout=20) == 5
        await client.close()
        stored = [s.seq for s in gw.samples.iter_samples("dev-1")]
    assert stored == [1, 2, 4, 5, 6]
    assert worker.stats.rejected == 1 and box.stats().pending == 0 and box.stats().rejected == 1
    assert box.rejected()[0][0] == 3 and "digest" in box.rejected()[0][1]
