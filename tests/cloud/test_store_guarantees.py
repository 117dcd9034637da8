"""The store guarantees, one suite over every backend: SQLite, and PostgreSQL with directory or S3 blobs.

Real parts only: a throwaway PostgreSQL, moto's S3 server, gRPC gateways on 127.0.0.1 (in-process, or
``tandem-cloud serve`` subprocesses killed with SIGKILL), the device's own client, outbox and uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import signal
import sqlite3
import subprocess
import sys

import grpc
import pytest
from store_support import BACKENDS, Backend, make_backend, pg_dsn, s3_bucket  # noqa: F401 (fixtures)
from transport_support import (
    REPO_ROOT,
    device_config,
    gateway_process,
    registered_client,
    running_gateway,
    sample_payload,
)

from cloud.samples.base import Sample
from device.transport.client import GatewayClient
from device.transport.outbox import Outbox, OutboxItem
from device.transport.uplink import UplinkWorker
from sim.link import LinkConfig, LinkProxy


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    return make_backend(request.param, tmp_path / "state", request)


@contextlib.asynccontextmanager
async def gateway(backend: Backend, name: str = "a", **overrides):
    fields = {**backend.fields(name), **overrides}
    async with running_gateway(fields.pop("data_dir"), **fields) as gw:
        yield gw


@functools.cache
def _payload(seq: int, size: int) -> bytes:
    """A valid uploaded sample (the gateway checks its format), different for each seq."""
    return sample_payload(seq, size)


def _items(start: int, n: int, size: int = 20_000) -> list[OutboxItem]:
    return [OutboxItem(s, _payload(s, size), {"k": str(s)}, 1) for s in range(start, start + n)]


def _seqs(store, device: str = "dev-1") -> list[int]:
    return [s.seq for s in store.iter_samples(device)]


async def test_idempotent_by_device_and_seq(backend, tmp_path):
    async with gateway(backend) as gw, registered_client(tmp_path / "dev", gw.address) as client:
        first = await client.upload(_items(1, 5, 100_000))  # several 64 KiB chunks per sample
        again = await client.upload(_items(3, 6, 100_000))
    assert (first.acked_seq, first.stored, first.duplicates) == (5, 5, 0)
    assert (again.acked_seq, again.stored, again.duplicates) == (8, 3, 3)
    store = backend.open_samples()
    try:
        batch = [Sample("dev-1", 8, b"x"), Sample("dev-1", 9, b"nine"), Sample("dev-1", 9, b"dup")]
        batch.append(Sample("d2", 8, b""))
        assert store.put(batch) == [False, True, False, True]
        assert store.put(batch) == [False, False, False, False]
        stored = list(store.iter_samples("dev-1"))
        assert [s.seq for s in stored] == list(range(1, 10))
        assert all(s.payload == _payload(s.seq, 100_000) and s.metadata == {"k": str(s.seq)} for s in stored[:8])
        assert stored[8].payload == b"nine"
        assert [s.seq for s in store.iter_samples("dev-1", after_seq=3, limit=2)] == [4, 5]
        assert (store.count(), store.count("dev-1"), store.high_water("dev-1")) == (10, 9, 9)
        assert store.high_water("none") == 0
        assert store.devices() == ["d2", "dev-1"] and list(store.iter_samples("d2"))[0].payload == b""
    finally:
        store.close()


class _Hooked:
    """Wraps the durable payload write of a gateway's sample store: ``hook()`` runs right after it."""

    def __init__(self, inner, method: str, hook) -> None:
        self._inner, self._method, self.hook = inner, method, hook

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def wrapped(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.hook()
            return out

        return wrapped


def _hook_payload_writes(gw) -> _Hooked:
    """The payload store's ``write`` (segment files or blobs) returns once the bytes are durable."""
    gw.samples.payloads = _Hooked(gw.samples.payloads, "write", lambda: None)
    return gw.samples.payloads


def _set_commit_failure(backend: Backend, seq: int | None) -> None:
    """A trigger that makes inserting ``seq`` fail (None removes it): the rows of that batch cannot commit."""
    if backend.name == "sqlite":
        conn = sqlite3.connect(backend.data_dir() / "samples.db", isolation_level=None)
        conn.execute("DROP TRIGGER IF EXISTS fail_insert")
        if seq is not None:
            conn.execute(
                f"CREATE TRIGGER fail_insert BEFORE INSERT ON samples WHEN NEW.seq = {seq}"
                " BEGIN SELECT RAISE(ABORT, 'injected commit failure'); END"
            )
        conn.close()
        return
    import psycopg

    with psycopg.connect(backend.store_fields["postgres_dsn"], autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS fail_insert ON samples")
        if seq is not None:
            conn.execute(
                "CREATE OR REPLACE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'injected commit failure'; END $$"
            )
            conn.execute(
                f"CREATE TRIGGER fail_insert BEFORE INSERT ON samples FOR EACH ROW WHEN (NEW.seq = {seq})"
                " EXECUTE FUNCTION fail_insert()"
            )


async def test_upload_is_acked_only_after_durable_blob_and_committed_rows(backend, tmp_path):
    async with (
        gateway(backend, sqlite_synchronous="FULL") as gw,
        registered_client(tmp_path / "dev", gw.address) as client,
    ):
        probe = backend.open_samples()  # another connection and blob client: what a restarted gateway would see
        try:
            hooked = _hook_payload_writes(gw)
            visible_at_blob_write: list[int] = []
            hooked.hook = lambda: visible_at_blob_write.append(probe.count("dev-1"))
            resp = await client.upload(_items(1, 4))
            assert resp.acked_seq == 4 and visible_at_blob_write == [0]  # bytes durable before any row existed
            got = [(s.seq, s.payload) for s in probe.iter_samples("dev-1")]
            assert got == [(s, _payload(s, 20_000)) for s in range(1, 5)]

            def blob_fails() -> None:
                raise OSError("injected blob write failure")

            hooked.hook = blob_fails
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.upload(_items(5, 3))
            assert err.value.code() != grpc.StatusCode.OK
            assert probe.high_water("dev-1") == 4 and probe.count("dev-1") == 4  # no row without its bytes

            hooked.hook = lambda: None
            _set_commit_failure(backend, 6)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.upload(_items(5, 3))
            assert probe.high_water("dev-1") == 4 and probe.count("dev-1") == 4  # nothing of the batch committed
            _set_commit_failure(backend, None)
            resp = await client.upload(_items(5, 3))
            assert (resp.acked_seq, resp.stored, resp.duplicates) == (7, 3, 0)  # the resend stores each once
            assert _seqs(probe) == list(range(1, 8))
        finally:
            probe.close()


N_KILL = 60
SIZE_KILL = 200_000


async def test_sigkill_mid_upload_loses_nothing_acked(backend, tmp_path):
    settings = backend.settings("a")
    data_dir = backend.data_dir("a")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with gateway_process(data_dir, "--role", "gateway", settings=settings) as (proc, address):
        host, port = address.rsplit(":", 1)
        proxy = LinkProxy(host, int(port), LinkConfig(up_mbps=80))  # about 1.2 s for the 12 MB: time to kill
        await proxy.start()
        dcfg = device_config(tmp_path / "dev", proxy.address, batch_max_samples=4, backoff_max_s=0.3)
        client = GatewayClient(dcfg)
        await client.register()
        box = Outbox(tmp_path / "dev" / "outbox.db")
        for seq in range(1, N_KILL + 1):
            assert box.put(_payload(seq, SIZE_KILL)) == seq
        worker = UplinkWorker(client, box, dcfg)
        push = asyncio.create_task(worker.push_all())
        while worker.stats.acked < 8:
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        still_queued = {it.seq for it in box.pending(max_samples=N_KILL, max_bytes=1 << 40)}
    acked_at_kill = set(range(1, N_KILL + 1)) - still_queued  # the device deleted these: the cloud acked them
    store = backend.open_samples()
    stored = set(_seqs(store))
    store.close()
    assert 8 <= len(acked_at_kill) < N_KILL
    assert acked_at_kill <= stored  # every acked sample survived the kill
    assert not push.done()
    with gateway_process(data_dir, "--role", "gateway", settings=settings) as (_, address2):
        host2, port2 = address2.rsplit(":", 1)
        proxy.retarget(host2, int(port2))
        await asyncio.wait_for(push, timeout=60)
        await client.close()
        await proxy.stop()
    store = backend.open_samples()
    samples = list(store.iter_samples("dev-1"))
    store.close()
    assert [s.seq for s in samples] == list(range(1, N_KILL + 1))  # each exactly once, in order
    assert all(s.payload == _payload(s.seq, SIZE_KILL) for s in samples)
    assert box.stats().pending == 0 and worker.stats.acked == N_KILL


async def test_two_gateways_taking_the_same_device_never_store_a_seq_twice(backend, tmp_path):
    if not backend.shared:
        pytest.skip("SQLite serves one gateway process; several gateways share state with store: postgres")
    rounds, per = 12, 8
    async with (
        gateway(backend, "a") as a,
        gateway(backend, "b") as b,
        registered_client(tmp_path / "dev", a.address) as via_a,
    ):
        identity = dataclasses.replace(via_a.identity, gateway=b.address)
        via_b = GatewayClient(device_config(tmp_path / "dev", b.address), identity=identity)
        try:
            responses = []
            for r in range(rounds):  # the device resends the same calls to both at once (it reconnected)
                items = _items(r * per + 1, per, 30_000)
                responses += await asyncio.gather(via_a.upload(items), via_b.upload(items))
        finally:
            await via_b.close()
    total = rounds * per
    assert sum(r.stored for r in responses) == total  # each seq counted as new exactly once, across gateways
    assert sum(r.duplicates for r in responses) == total
    assert max(r.acked_seq for r in responses) == total
    store = backend.open_samples()
    samples = list(store.iter_samples("dev-1"))
    count = store.count()
    store.close()
    assert [s.seq for s in samples] == list(range(1, total + 1)) and count == total
    assert all(s.payload == _payload(s.seq, 30_000) for s in samples)


def _publish_as_trainer(backend: Backend, tmp_path, base: str, target: str, payload: bytes) -> None:
    """Another process publishes, as the trainer does: ``tandem-cloud updates publish`` on the shared config."""
    cfg = backend.write_config(tmp_path / "trainer.yaml", "trainer")
    blob = tmp_path / f"{target}.bin"
    blob.write_bytes(payload)
    cmd = [sys.executable, "-m", "cloud.cli", "updates", "publish", str(blob), "--base", base, "--target", target,
           "--device", "dev-1", "--config", str(cfg)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


async def test_watch_updates_sees_updates_published_elsewhere(backend, tmp_path):
    # Shared backends: a 30 s poll interval, so only LISTEN/NOTIFY can deliver within the 5 s waited below.
    poll = 30.0 if backend.shared else 0.2
    async with (
        gateway(backend, "b", watch_poll_interval_s=poll) as b,
        registered_client(tmp_path / "dev", b.address) as client,
    ):
        notices: asyncio.Queue = asyncio.Queue()

        async def watch() -> None:
            async for notice in client.watch("v0", 0):
                await notices.put(notice.header)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.sleep(0.3)
            if backend.shared:
                async with gateway(backend, "a") as a:
                    record = a.publish("dev-1", "v0", "v1", b"published through gateway a")
                    header = await asyncio.wait_for(notices.get(), 5)
                    assert (header.update_id, header.target_version) == (record.update_id, "v1")
            base = "v1" if backend.shared else "v0"
            await asyncio.to_thread(_publish_as_trainer, backend, tmp_path, base, "v2", b"from the trainer" * 1000)
            header = await asyncio.wait_for(notices.get(), 5)
            assert (header.base_version, header.target_version) == (base, "v2")
            data = b"".join([c.data async for c in client.fetch(header.update_id, 0)])  # served by b
            assert data == b"from the trainer" * 1000
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await watcher


def test_a_commit_returns_the_high_waters_and_pending_stats_reads_no_payload(backend: Backend):
    """What the gateway acks comes from the commit itself (a batch of duplicates too); the scheduler's view counts
    samples and bytes after a cursor, up to a limit, on every backend."""
    store = backend.open_samples()
    try:
        first = store.commit([Sample("dev-1", s, b"x" * s) for s in (1, 2, 5)] + [Sample("dev-2", 3, b"yy")])
        assert first.new == [True] * 4 and first.high_water == {"dev-1": 5, "dev-2": 3}
        again = store.commit([Sample("dev-1", 2, b"xx"), Sample("dev-1", 2, b"xx")])  # resent: nothing new
        assert again.new == [False, False] and again.high_water == {"dev-1": 5}
        stats = store.pending_stats("dev-1", after_seq=1, limit=10)
        assert (stats.count, stats.bytes, stats.upto_seq) == (2, 2 + 5, 5)
        limited = store.pending_stats("dev-1", after_seq=0, limit=2)
        assert (limited.count, limited.bytes, limited.upto_seq) == (2, 1 + 2, 2)
        assert store.pending_stats("dev-3", after_seq=0, limit=10).count == 0
    finally:
        store.close()
