"""Update fetcher: resume after a cut, verification failures leave the device unchanged, watch loop."""

from __future__ import annotations

import asyncio

from transport_support import device_config, running_gateway

from cloud.updates import SqliteUpdateRegistry
from common.signing import generate_private_key
from device.transport.client import GatewayClient
from device.transport.fetcher import UpdateFetcher
from sim.link import LinkConfig, LinkProxy


class Recorder:
    """Apply callback that remembers what it was given."""

    def __init__(self) -> None:
        self.applied: list[tuple[bytes, str]] = []

    def __call__(self, payload, header) -> None:
        self.applied.append((payload, header.target_version))


async def _fetcher(tmp_path, address, apply, **overrides):
    cfg = device_config(tmp_path / "dev", address, **overrides)
    client = GatewayClient(cfg)
    identity = await client.register()
    return client, UpdateFetcher(client, identity, cfg, apply)


async def test_cut_mid_update_resumes_from_offset(tmp_path):
    payload = bytes(range(256)) * 8192  # 2 MiB = 32 chunks of 64 KiB
    async with running_gateway(tmp_path / "cloud") as gw:
        link = LinkConfig(down_mbps=16, seed=3)  # about 1 s for the payload
        async with LinkProxy("127.0.0.1", gw.port, link) as proxy:
            rec = Recorder()
            client, fetcher = await _fetcher(tmp_path, proxy.address, rec)
            record = gw.publish("dev-1", "v0", "v1", payload)

            async def cutter():
                while fetcher.stats.bytes_fetched < 500_000:
                    await asyncio.sleep(0.01)
                proxy.cut_all()

            cut = asyncio.create_task(cutter())
            outcome = await asyncio.wait_for(fetcher.fetch_and_apply(record.update_id), timeout=60)
            await cut
            await client.close()
    assert outcome.applied, outcome.reason
    assert len(fetcher.stats.fetch_offsets) >= 2 and fetcher.stats.fetch_offsets[0] == 0
    assert fetcher.stats.fetch_offsets[1] >= 500_000  # resumed, not restarted
    assert fetcher.stats.bytes_fetched == len(payload)  # no byte fetched twice
    assert rec.applied == [(payload, "v1")] and fetcher.current_version == "v1"


async def test_tampered_wrong_signature_and_wrong_base_are_rejected(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        rec = Recorder()
        client, fetcher = await _fetcher(tmp_path, gw.address, rec)
        tampered = gw.publish("dev-1", "v0", "v1", b"A" * 200_000)
        blob = gw.updates.blob_path(tampered)
        raw = bytearray(blob.read_bytes())
        raw[123_456] ^= 0x01
        blob.write_bytes(bytes(raw))
        foreign = SqliteUpdateRegistry(gw.updates.data_dir, generate_private_key())
        forged = foreign.publish("dev-1", "v0", "v1", b"B" * 1000)
        foreign.close()
        wrong_base = gw.publish("dev-1", "v7", "v8", b"C" * 1000)
        outcomes = [await fetcher.fetch_and_apply(u.update_id) for u in (tampered, forged, wrong_base)]
        await client.close()
    assert [o.applied for o in outcomes] == [False, False, False]
    assert "digest" in outcomes[0].reason
    assert "signature" in outcomes[1].reason
    assert "base version" in outcomes[2].reason
    assert rec.applied == [] and fetcher.current_version == "v0"
    assert not list((tmp_path / "dev" / "updates").glob("*.part"))
    assert (
        fetcher.stats.bytes_fetched == 200_000 + 1000
    )  # tampered + forged; the wrong base stops at the header


async def test_failed_apply_keeps_version(tmp_path):
    def broken(payload, header):
        raise ValueError("weights got worse")

    async with running_gateway(tmp_path / "cloud") as gw:
        client, fetcher = await _fetcher(tmp_path, gw.address, broken)
        record = gw.publish("dev-1", "v0", "v1", b"x" * 10)
        outcome = await fetcher.fetch_and_apply(record.update_id)
        await client.close()
    assert not outcome.applied and "weights got worse" in outcome.reason
    assert fetcher.current_version == "v0"


async def test_watch_applies_chain_and_cohort_updates(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        rec = Recorder()
        client, fetcher = await _fetcher(tmp_path, gw.address, rec, cohort="jetsons")
        gw.publish("dev-1", "v0", "v1", b"one")
        gw.publish("other", "v1", "v9", b"not mine")
        stop = asyncio.Event()
        task = asyncio.create_task(fetcher.run(stop))
        await asyncio.sleep(0.3)
        gw.publish_cohort("jetsons", "v1", "v2", b"two")
        for _ in range(100):
            if fetcher.current_version == "v2":
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        await client.close()
    assert rec.applied == [(b"one", "v1"), (b"two", "v2")]


async def test_sync_once_sees_updates_published_before(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        rec = Recorder()
        client, fetcher = await _fetcher(tmp_path, gw.address, rec)
        gw.publish("dev-1", "v0", "v1", b"one")
        gw.publish("dev-1", "v1", "v2", b"two")
        outcomes = await fetcher.sync_once()
        await client.close()
    assert [o.version for o in outcomes] == ["v1", "v2"]


async def test_watch_sees_updates_published_by_another_process(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        rec = Recorder()
        client, fetcher = await _fetcher(tmp_path, gw.address, rec)
        stop = asyncio.Event()
        task = asyncio.create_task(fetcher.run(stop))
        await asyncio.sleep(0.1)
        # what `tandem-cloud updates publish` does from its own process:
        other = SqliteUpdateRegistry(gw.updates.data_dir, gw.signing_key)
        other.publish("dev-1", "v0", "v1", b"from the cli")
        other.close()
        for _ in range(100):
            if rec.applied:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        await client.close()
    assert rec.applied == [(b"from the cli", "v1")]


async def test_resume_from_partial_file_left_by_a_previous_run(tmp_path):
    payload = bytes(range(256)) * 1024
    async with running_gateway(tmp_path / "cloud") as gw:
        rec = Recorder()
        client, fetcher = await _fetcher(tmp_path, gw.address, rec)
        good = gw.publish("dev-1", "v0", "v1", payload)
        (tmp_path / "dev" / "updates" / f"{good.update_id}.part").write_bytes(payload[:100_000])
        outcome = await fetcher.fetch_and_apply(good.update_id)
        assert outcome.applied and fetcher.stats.fetch_offsets == [100_000]
        assert fetcher.stats.bytes_fetched == len(payload) - 100_000
        # a partial file with wrong bytes: the digest fails, the fetcher refetches once from 0
        stale = gw.publish("dev-1", "v1", "v2", payload[::-1])
        (tmp_path / "dev" / "updates" / f"{stale.update_id}.part").write_bytes(b"\xff" * 5000)
        outcome = await fetcher.fetch_and_apply(stale.update_id)
        await client.close()
    assert outcome.applied, outcome.reason
    assert fetcher.stats.fetch_offsets[-2:] == [5000, 0]
    assert rec.applied == [(payload, "v1"), (payload[::-1], "v2")]
