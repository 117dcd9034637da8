"""Fan-in of many devices through two gateways sharing PostgreSQL, against one SQLite gateway (same run).

``python -m bench.pg_fanin [--quick] [--devices 1000] [--dsn DSN]``. Each emulated device has its own channel
and token and uploads one sample (16 KiB) at Poisson-distributed times (mean interval 5 s: 200 uploads/s in
all). Halfway through, every device reconnects to the other gateway and first resends its last acked sample
there (a device unsure whether its ack arrived). Ack latency runs from the Upload call to its ack (durably
stored: rows committed, payload fsynced). Afterwards every acked sample is read back and checked byte for byte.

The PostgreSQL case starts a throwaway server (``--dsn`` uses an existing, empty database instead), two
``tandem-cloud serve`` processes with ``store: postgres`` and a shared blob directory; the baseline is one
``tandem-cloud serve`` on SQLite, durable too (``synchronous=FULL``). Lost: acked samples missing or
different. Duplicated: stored rows beyond one per (device, seq), and samples the gateways reported as newly
stored more than once. Targets: the two PostgreSQL gateways' p99 ack at most 2x the SQLite gateway's measured in
the same run (sharing a database across gateways may cost something, not an order of magnitude), and 0 lost and
0 duplicated in both cases (counts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import psutil
from rich.console import Console
from rich.table import Table

from bench._verdict import verdict
from bench.transport_common import gateway_process, sample_payload
from cloud.config import GatewayConfig
from cloud.stores import open_sample_store
from device.transport.client import GatewayClient
from device.transport.config import DeviceClientConfig
from device.transport.outbox import OutboxItem

_POOL = 64


@functools.cache
def _valid_sample(i: int, size: int) -> bytes:
    return sample_payload(i, size)


def payload_of(device_id: str, seq: int, size: int) -> bytes:
    """The sample a device sends as ``seq``: a valid upload (the gateway checks the format), one of a pool of
    distinct ones chosen by (device, seq), so the read-back can check every byte."""
    digest = hashlib.sha256(f"{device_id}/{seq}".encode()).digest()
    return _valid_sample(int.from_bytes(digest[:4], "big") % _POOL, size)


@dataclasses.dataclass
class FleetResult:
    """What the devices saw."""

    latencies: list[float] = dataclasses.field(default_factory=list)
    acked: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    reported_new: int = 0
    resends: int = 0
    errors: int = 0


async def _upload(client: GatewayClient, item: OutboxItem, result: FleetResult):
    """Upload until acked (a failed call is retried, as the device's uplink does); returns the response."""
    last = None
    for attempt in range(20):
        try:
            return await client.upload([item])
        except grpc.aio.AioRpcError as exc:
            result.errors += 1
            last = exc
            await asyncio.sleep(0.05 * (attempt + 1))
    raise RuntimeError(
        f"seq {item.seq} was never acked: {last.code().name if last else ''} {last.details() if last else ''}"
    )


async def _device(
    idx: int,
    clients: list[GatewayClient],
    addresses: list[str],
    size: int,
    interval_s: float,
    switch_at: float,
    until: float,
    result: FleetResult,
) -> None:
    rng = random.Random(idx)
    client = clients[idx]
    identity = client.identity
    assert identity is not None
    dev = identity.device_id
    acked = result.acked.setdefault(dev, set())
    seq, last, switched = 0, None, False
    await asyncio.sleep(rng.uniform(0, interval_s))
    while time.monotonic() < until:
        if not switched and time.monotonic() >= switch_at:
            other = addresses[(addresses.index(identity.gateway) + 1) % len(addresses)]
            moved = GatewayClient(client.config.model_copy(update={"gateway": other}),
                                  dataclasses.replace(identity, gateway=other))  # fmt: skip
            await client.close()
            client, switched = moved, True
            if last is not None:  # resend the last acked sample to the new gateway: must not be stored again
                resp = await _upload(client, last, result)
                result.reported_new += resp.stored
                result.resends += 1
        seq += 1
        data = payload_of(dev, seq, size)
        item = OutboxItem(seq, data, {"bench": "fanin"}, int(time.time() * 1000), hashlib.sha256(data).digest())
        start = time.perf_counter()
        resp = await _upload(client, item, result)
        result.latencies.append(time.perf_counter() - start)
        if resp.acked_seq < seq:
            raise RuntimeError(f"{dev}: acked {resp.acked_seq}, sent {seq}")
        acked.add(seq)
        result.reported_new += resp.stored
        last = item
        await asyncio.sleep(rng.expovariate(1.0 / interval_s))
    await client.close()


async def run_fleet(addresses: list[str], state: Path, n: int, seconds: float, size: int, interval_s: float):
    """Register ``n`` devices spread over ``addresses``, run them, return what they saw."""
    clients = []
    for i in range(n):
        cfg = DeviceClientConfig(
            gateway=addresses[i % len(addresses)], state_dir=state / f"d{i}", device_id=f"dev-{i:04d}"
        )
        clients.append(GatewayClient(cfg))
    for start in range(0, n, 50):  # register in waves, as a fleet coming online
        await asyncio.gather(*(c.register() for c in clients[start : start + 50]))
    result = FleetResult()
    now = time.monotonic()
    await asyncio.gather(
        *(_device(i, clients, addresses, size, interval_s, now + seconds / 2, now + seconds, result) for i in range(n))
    )
    return result


def check_store(config: GatewayConfig, result: FleetResult, size: int) -> tuple[int, int]:
    """(lost, duplicated) from reading back every device's samples."""
    store = open_sample_store(config, config.data_dir)
    lost = duplicated = 0
    stored_total = 0
    try:
        for dev, acked in result.acked.items():
            rows = list(store.iter_samples(dev))
            seqs = [s.seq for s in rows]
            duplicated += len(seqs) - len(set(seqs))
            stored_total += len(set(seqs))
            good = {s.seq for s in rows if s.payload == payload_of(dev, s.seq, size)}
            lost += len(acked - good)
    finally:
        store.close()
    duplicated += max(result.reported_new - stored_total, 0)  # a sample reported new by two gateways
    return lost, duplicated


def _settings(**fields) -> tuple[dict, GatewayConfig]:
    """GatewayConfig keys for ``gateway_process`` (the DSN in clear: the file is the process's own) and the model."""
    cfg = GatewayConfig(host="127.0.0.1", port=0, sqlite_synchronous="FULL", open_enrollment=True, **fields)
    data = cfg.model_dump(mode="json", exclude_none=True)
    if cfg.postgres_dsn is not None:
        data["postgres_dsn"] = cfg.dsn()
    return data, cfg


@contextmanager
def _postgres(dsn: str | None):
    if dsn:
        yield dsn
        return
    from bench._pg_cluster import throwaway_postgres

    with throwaway_postgres() as cluster:
        yield cluster.dsn()


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else values[0]


@dataclasses.dataclass
class Case:
    """One backend's run: what the devices saw, the read-back, and the CPU it took."""

    name: str
    gateways: int
    fleet: FleetResult
    lost: int = 0
    duplicated: int = 0
    cpu_gateways_s: float = 0.0
    cpu_devices_s: float = 0.0
    load_before: float = 0.0


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def _run_case(name: str, addresses: list[str], pids: list[int], state: Path, fleet: tuple) -> Case:
    load = os.getloadavg()[0]
    cpu0 = time.process_time()
    result = asyncio.run(run_fleet(addresses, state, *fleet))
    return Case(name, len(addresses), result, cpu_gateways_s=_cpu(pids),
                cpu_devices_s=time.process_time() - cpu0, load_before=load)  # fmt: skip


def _row(case: Case, base_p99: float) -> list[str]:
    lat = case.fleet.latencies
    p99 = _pct(lat, 99)
    return [
        case.name,
        str(case.gateways),
        str(len(lat)),
        f"{_pct(lat, 50) * 1000:.1f}",
        f"{_pct(lat, 95) * 1000:.1f}",
        f"{p99 * 1000:.1f}",
        f"{max(lat) * 1000:.1f}",
        f"{p99 / base_p99:.2f}",
        str(case.fleet.resends),
        str(case.fleet.errors),
        str(case.lost),
        str(case.duplicated),
        f"{case.cpu_gateways_s:.1f} / {case.cpu_devices_s:.1f}",
        f"{case.load_before:.1f}",
    ]


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console(width=190).print(table)


def main(argv: list[str] | None = None) -> int:
    """Run the SQLite baseline, then two gateways on PostgreSQL, with the same fleet; print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 s per case instead of 60 s")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=None, help="duration of each case")
    parser.add_argument("--interval", type=float, default=5.0, help="mean seconds between a device's uploads")
    parser.add_argument("--size", type=int, default=16 * 1024, help="sample bytes")
    parser.add_argument("--dsn", default=None, help="use this (empty) PostgreSQL database instead of a throwaway one")
    args = parser.parse_args(argv)
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    fleet = (args.devices, seconds, args.size, args.interval)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "signing.pem"
        settings, sqlite_cfg = _settings(data_dir=tmp / "sqlite", signing_key=key)
        with gateway_process(sqlite_cfg.data_dir, "--role", "gateway", settings=settings) as (proc, address):
            base = _run_case("SQLite (baseline)", [address], [proc.pid], tmp / "dev-sqlite", fleet)
        base.lost, base.duplicated = check_store(sqlite_cfg, base.fleet, args.size)
        with _postgres(args.dsn) as dsn, ExitStack() as stack:
            shared = {"store": "postgres", "postgres_dsn": dsn, "blobs": {"directory": str(tmp / "shared-blobs")}}
            addresses, pids = [], []
            for name in ("a", "b"):
                settings, pg_cfg = _settings(data_dir=tmp / f"pg-{name}", signing_key=key, **shared)
                gateway = gateway_process(pg_cfg.data_dir, "--role", "gateway", settings=settings)
                proc, address = stack.enter_context(gateway)
                addresses.append(address)
                pids.append(proc.pid)
            pg = _run_case("PostgreSQL + shared blob dir", addresses, pids, tmp / "dev-pg", fleet)
            stack.close()
            pg.lost, pg.duplicated = check_store(pg_cfg, pg.fleet, args.size)
    base_p99 = _pct(base.fleet.latencies, 99)
    _print_table(
        f"Fan-in: {args.devices} devices, {args.size // 1024} KiB samples, Poisson mean {args.interval:g} s, "
        f"{seconds:.0f} s per case, every device moves gateway halfway ({os.cpu_count()} CPUs)",
        [
            "backend",
            "gateways",
            "acked uploads",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "p99 vs SQLite",
            "resends",
            "retried calls",
            "lost",
            "duplicated",
            "CPU s gateways / devices",
            "load avg",
        ],  # fmt: skip
        [_row(base, base_p99), _row(pg, base_p99)],
    )
    p99 = _pct(pg.fleet.latencies, 99)
    ratio = p99 / base_p99
    print(
        f"two PostgreSQL gateways, {args.devices} devices: p99 ack = {p99 * 1000:.1f} ms, "
        f"{ratio:.2f}x one SQLite gateway's {base_p99 * 1000:.1f} ms (target <= 2x); "
        f"lost = {pg.lost}, duplicated = {pg.duplicated} (targets 0, counts)"
    )
    return verdict(
        "pg_fanin",
        [
            (ratio <= 2.0, f"PostgreSQL p99 {ratio:.2f}x the SQLite baseline's, same run (target <= 2)"),
            (pg.lost == base.lost == 0, f"lost {pg.lost} PostgreSQL, {base.lost} SQLite (target 0)"),
            (pg.duplicated == base.duplicated == 0, f"duplicated {pg.duplicated} / {base.duplicated} (target 0)"),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
