"""kill -9 of the gateway mid-upload and between store and ack, restart on the same data dir: acked samples kept,
none twice."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from transport_support import device_config, gateway_process, sample_payload

from cloud.samples import SqliteSampleStore
from common.faults import fault_env
from device.transport.client import GatewayClient
from device.transport.outbox import Outbox
from device.transport.uplink import UplinkWorker
from sim.link import LinkConfig, LinkProxy

N = 60
SIZE = 200_000


_PAYLOADS: dict[int, bytes] = {}


def _payload(seq: int) -> bytes:
    if seq not in _PAYLOADS:
        _PAYLOADS[seq] = sample_payload(seq, SIZE)
    return _PAYLOADS[seq]


async def test_sigkill_mid_upload_then_restart(tmp_path):
    data_dir = tmp_path / "cloud"
    with gateway_process(data_dir) as (proc, address):
        host, port = address.rsplit(":", 1)
        proxy = LinkProxy(host, int(port), LinkConfig(up_mbps=80))  # about 1.2 s for the 12 MB: time to kill
        await proxy.start()
        cfg = device_config(tmp_path / "dev", proxy.address, batch_max_samples=4, backoff_max_s=0.3)
        client = GatewayClient(cfg)
        await client.register()
        box = Outbox(tmp_path / "dev" / "outbox.db")
        for seq in range(1, N + 1):
            assert box.put(_payload(seq)) == seq
        worker = UplinkWorker(client, box, cfg)
        push = asyncio.create_task(worker.push_all())
        while worker.stats.acked < 8:
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        still_queued = {it.seq for it in box.pending(max_samples=N, max_bytes=1 << 40)}
    acked_at_kill = set(range(1, N + 1)) - still_queued  # the device deleted these: the cloud acked them
    store = SqliteSampleStore(data_dir / "samples.db")
    stored = {s.seq for s in store.iter_samples("dev-1")}
    store.close()
    assert 8 <= len(acked_at_kill) < N
    assert acked_at_kill <= stored  # every acked sample survived the kill
    assert not push.done()  # the device still holds unacked samples and keeps retrying
    with gateway_process(data_dir) as (_, address2):
        host2, port2 = address2.rsplit(":", 1)
        proxy.retarget(host2, int(port2))
        await asyncio.wait_for(push, timeout=60)
        await client.close()
        await proxy.stop()
    store = SqliteSampleStore(data_dir / "samples.db")
    samples = list(store.iter_samples("dev-1"))
    store.close()
    assert [s.seq for s in samples] == list(range(1, N + 1))  # each exactly once, in order
    assert all(s.payload == _payload(s.seq) for s in samples)
    assert box.stats().pending == 0 and worker.stats.acked == N
    assert worker.stats.attempts_failed >= 1  # the cut upload was retried


async def test_sigkill_between_store_and_ack_then_restart(tmp_path, monkeypatch):
    """The gateway dies after storing an Upload call's samples and before acking them (a test fault point):
    the device keeps them queued, resends after the restart, and the cloud stores each exactly once."""
    fault = tmp_path / "fault"
    fault.write_text("gateway.after_store")
    for key, value in fault_env(fault).items():
        monkeypatch.setenv(key, value)  # the gateway subprocesses inherit it
    data_dir = tmp_path / "cloud"
    n, size = 12, 20_000
    with gateway_process(data_dir) as (proc, address):
        host, port = address.rsplit(":", 1)
        proxy = LinkProxy(host, int(port), LinkConfig())
        await proxy.start()
        cfg = device_config(tmp_path / "dev", proxy.address, batch_max_samples=4, max_in_flight_batches=1)
        client = GatewayClient(cfg)
        await client.register()
        box = Outbox(tmp_path / "dev" / "outbox.db")
        payloads = {seq: sample_payload(seq, size) for seq in range(1, n + 1)}
        for seq in range(1, n + 1):
            assert box.put(payloads[seq]) == seq
        worker = UplinkWorker(client, box, cfg)
        push = asyncio.create_task(worker.push_all())
        assert await asyncio.to_thread(proc.wait, 60) == -signal.SIGKILL
        assert Path(f"{fault}.fired").read_text() == "gateway.after_store" and not fault.exists()
    store = SqliteSampleStore(data_dir / "samples.db")
    stored_at_kill = [s.seq for s in store.iter_samples("dev-1")]
    store.close()
    queued_at_kill = [it.seq for it in box.pending(max_samples=n, max_bytes=1 << 40)]
    assert stored_at_kill == [1, 2, 3, 4]  # the first call's samples were stored ...
    assert queued_at_kill == list(range(1, n + 1)) and worker.stats.acked == 0  # ... and none was acked
    with gateway_process(data_dir) as (_, address2):
        host2, port2 = address2.rsplit(":", 1)
        proxy.retarget(host2, int(port2))
        await asyncio.wait_for(push, timeout=60)
        await client.close()
        await proxy.stop()
    store = SqliteSampleStore(data_dir / "samples.db")
    samples = list(store.iter_samples("dev-1"))
    store.close()
    assert [s.seq for s in samples] == list(range(1, n + 1))  # each exactly once
    assert all(s.payload == payloads[s.seq] for s in samples)
    assert box.stats().pending == 0 and worker.stats.acked == n
    assert worker.stats.duplicates == 4  # the resent first call: recognised, not stored twice
