"""Retry policy: permanent statuses quarantine the sample (kept, with its reason) and the queue moves on."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
import pytest
from transport_support import device_config, running_gateway, sample_payload

from device.cli import main as device_main
from device.transport.client import GatewayClient
from device.transport.identity import DeviceIdentity
from device.transport.outbox import Outbox
from device.transport.uplink import UplinkWorker
from protocol.tandem.v1 import gateway_pb2, gateway_pb2_grpc


class RefusingGateway(gateway_pb2_grpc.DeviceGatewayServicer):
    """A real gRPC server that refuses any call carrying one seq with ``code`` and names no seq."""

    def __init__(self, bad_seq: int, code: grpc.StatusCode) -> None:
        self.bad_seq, self.code, self.stored, self.calls = bad_seq, code, set(), 0

    async def Upload(self, request_iterator, context):
        self.calls += 1
        seqs = {c.seq async for c in request_iterator}
        if self.bad_seq in seqs:
            await context.abort(self.code, "refused")
        self.stored |= seqs
        return gateway_pb2.UploadResponse(acked_seq=max(self.stored), stored=len(seqs))


async def _push_against(tmp_path, code: grpc.StatusCode) -> tuple[RefusingGateway, Outbox, UplinkWorker]:
    servicer = RefusingGateway(5, code)
    server = grpc.aio.server()
    gateway_pb2_grpc.add_DeviceGatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        cfg = device_config(tmp_path / "dev", f"127.0.0.1:{port}", batch_max_samples=4, max_server_error_attempts=3)
        identity = DeviceIdentity("dev-1", "t", "", cfg.gateway, "", 65536, 1 << 20)
        box = Outbox(tmp_path / "dev" / "outbox.db")
        for i in range(10):
            box.put(sample_payload(i, 600))
        async with GatewayClient(cfg, identity) as client:
            worker = UplinkWorker(client, box, cfg)
            assert await asyncio.wait_for(worker.push_all(), timeout=30) == 9
    finally:
        await server.stop(0)
    return servicer, box, worker


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNKNOWN]
)
async def test_refused_batch_is_searched_one_by_one_and_only_the_bad_sample_is_quarantined(tmp_path, code):
    servicer, box, worker = await _push_against(tmp_path, code)
    assert servicer.stored == set(range(1, 11)) - {5}
    assert box.stats().pending == 0 and worker.stats.rejected == 1
    [item] = box.quarantined()
    assert item.seq == 5 and item.reason == f"{code.name}: refused" and item.size > 0
    assert box.quarantined_payload(5)  # kept, inspectable


async def test_unauthenticated_is_raised_not_quarantined(tmp_path):
    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = device_config(tmp_path / "dev", gw.address)
        async with GatewayClient(cfg, DeviceIdentity("dev-1", "forged", "", gw.address, "", 65536, 1 << 20)) as c:
            box = Outbox(tmp_path / "dev" / "outbox.db")
            box.put(sample_payload(1, 600))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await UplinkWorker(c, box, cfg).push_all()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert box.stats().pending == 1 and box.quarantined() == []


async def test_sample_the_real_gateway_refuses_is_quarantined_then_cli_lists_retries_purges(tmp_path, capsys):
    state = tmp_path / "dev"
    async with running_gateway(tmp_path / "cloud") as gw:
        cfg = device_config(state, gw.address)
        client = GatewayClient(cfg)
        (await client.register()).save(state)
        box = Outbox(state / "outbox.db")
        for i in range(4):
            box.put(sample_payload(i, 800))
        with sqlite3.connect(state / "outbox.db") as db:  # seq 2 rots on disk into something not a sample
            db.execute("UPDATE outbox SET payload = zeroblob(800) WHERE seq = 2")
        garbage = bytes(800)
        import hashlib

        with sqlite3.connect(state / "outbox.db") as db:
            db.execute("UPDATE outbox SET sha256 = ? WHERE seq = 2", (hashlib.sha256(garbage).digest(),))
        worker = UplinkWorker(client, box, cfg)
        assert await asyncio.wait_for(worker.push_all(), timeout=20) == 3
        await client.close()
        assert [s.seq for s in gw.samples.iter_samples("dev-1")] == [1, 3, 4]
    box.close()

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            device_main([*argv, "--state-dir", str(state)])
        out, err = capsys.readouterr()
        return int(exit_info.value.code or 0), out, err

    code, out, _ = run("outbox", "quarantine", "list")
    assert code == 0 and "INVALID_ARGUMENT" in out and "2" in out
    code, _, err = run("outbox", "quarantine", "retry", "7")
    assert code == 1 and "not quarantined: seq 7" in err
    code, out, _ = run("outbox", "quarantine", "retry")
    assert code == 0 and "requeued 1 samples" in out
    assert [it.seq for it in Outbox(state / "outbox.db").pending()] == [2]
    Outbox(state / "outbox.db").quarantine(2, "INVALID_ARGUMENT: again")
    code, _, err = run("outbox", "quarantine", "purge")
    assert code == 1 and "--yes" in err
    code, out, _ = run("outbox", "quarantine", "purge", "2", "--yes")
    assert code == 0 and "purged 1 samples" in out
    code, out, _ = run("outbox", "quarantine", "list")
    assert "no quarantined samples" in out
