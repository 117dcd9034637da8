"""kill -9 of the gateway mid-upload, restart on the same data dir: acked samples kept, none twice."""

from __future__ import annotations

import asyncio
import signal

from transport_support import device_config, gateway_process, sample_payload

from cloud.samples import SqliteSampleStore
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
