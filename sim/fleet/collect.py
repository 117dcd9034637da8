"""Turn what the probes, links and the cloud's stores recorded into a FleetResult."""

from __future__ import annotations

import logging
from typing import Any

from sim.fleet.cloud_process import CloudProcess
from sim.fleet.devices import SimDevice
from sim.fleet.probe import ProbeData
from sim.fleet.results import DeviceResult, FleetResult, SampleCounts, UpdateApplied
from sim.fleet.scenario import Scenario

log = logging.getLogger("tandem.sim.fleet")

UPTO_KEYS = ("trained_upto_seq", "upto_seq", "samples_upto_seq", "max_seq")
"""Update metadata naming the highest of the device's seqs the update learnt from (when the cloud records it)."""


def _phases(d: SimDevice, duration: float) -> list[dict]:
    steps = d.spec.drift.steps
    return [
        {"domain": s.domain, "start_s": s.at_s, "end_s": d.spec.drift.phase_end(i, duration)}
        for i, s in enumerate(steps)
    ]


def _upto(record, data: ProbeData) -> tuple[int, bool]:
    """Highest seq an update learnt from: from its metadata, else every sample acked before it was published
    (an upper bound; flagged)."""
    for key in UPTO_KEYS:
        if key in record.metadata:
            try:
                return int(record.metadata[key]), True
            except ValueError:
                break
    return -1, False


def _updates(d: SimDevice, records: dict[int, Any], publish_s: dict[int, float]) -> tuple[list[UpdateApplied], bool]:
    """Applied updates with the capture-to-applied latency of each sample they were the first to learn from."""
    data = d.probe.data
    covered = 0
    exact = True
    out = []
    for a in data.applied:
        rec = records.get(a.update_id) if a.update_id is not None else None
        upto = -1
        if rec is not None:
            upto, known = _upto(rec, data)
            if not known:
                exact = False
                pub = publish_s.get(a.update_id, a.t_s)
                upto = max((s for s, q in data.queued.items() if q.acked_s is not None and q.acked_s <= pub), default=0)
        lat = [a.t_s - q.captured_s for s, q in data.queued.items() if covered < s <= upto]
        covered = max(covered, upto)
        out.append(UpdateApplied(t_s=a.t_s, version=a.version, latencies_s=sorted(lat)))
    return out, exact


def collect_results(run: str, sc: Scenario, devices: list[SimDevice], cloud: CloudProcess, facts: dict) -> FleetResult:
    """Per-device results, checked against the cloud's sample store and update registry."""
    stores = _open_stores(cloud)
    send_all = facts.get("send_all_sample_bytes", 0)
    out = []
    exact_all = True
    for d in devices:
        data = d.probe.data
        did = d.spec.device_id
        records, stored_seqs = {}, set()
        if stores is not None:
            samples, registry = stores
            stored_seqs = {s.seq for s in samples.iter_samples(did)}
            records = {r.update_id: r for r in registry.for_device(did, d.spec.cohort)}
        epoch_unix_ms = facts.get("epoch_unix_ms", 0)
        publish_s = {i: (r.created_unix_ms - epoch_unix_ms) / 1000 for i, r in records.items()}
        updates, exact = _updates(d, records, publish_s)
        exact_all &= exact
        acked = [s for s, q in data.queued.items() if q.acked_s is not None]
        applied_ids = {a.update_id for a in data.applied if a.update_id is not None}
        rejected = [o for o in d.agent.link.fetcher.outcomes if not o.applied] if d.agent.link else []
        last_applied = max(applied_ids, default=0)
        superseded = [i for i in records if i not in applied_ids and i < last_applied]
        out.append(
            DeviceResult(
                device_id=did,
                group=d.spec.group,
                cohort=d.spec.cohort,
                link=d.spec.link.model_dump(mode="json"),
                points=d.points,
                updates=updates,
                rollbacks=data.rollbacks,
                refused_candidates=0,
                published_updates=len(records),
                superseded_updates=len(superseded),
                samples=SampleCounts(
                    frames=d.source.emitted,
                    selected=len(data.queued),
                    acked=len(acked),
                    stored=len(stored_seqs),
                    stored_twice=0,
                    pending=len(data.queued) - len(acked),
                    lost=len([s for s in acked if s not in stored_seqs]) if stores is not None else 0,
                ),
                up_bytes=d.proxy.stats.bytes_up,
                down_bytes=d.proxy.stats.bytes_down,
                link_stats={k: getattr(d.proxy.stats, k) for k in ("connections", "refused", "cuts", "retransmits")},
                send_all_bytes=int(send_all * d.source.emitted),
                ask_ms=data.ask_ms,
                upload_ack_ms=data.upload_ack_ms,
                phases=_phases(d, sc.duration_s),
            )
        )
        facts.setdefault("updates_rejected_by_devices", 0)
        facts["updates_rejected_by_devices"] += len(rejected)
    facts["latency_from_update_metadata"] = exact_all
    if stores is not None:
        for s in stores:
            s.close()
    return FleetResult(run=run, scenario=sc.model_dump(mode="json"), devices=out, facts=facts)


def _open_stores(cloud: CloudProcess):
    """The cloud's sample store and update registry, opened read-side after the service stopped."""
    try:
        from pathlib import Path

        from cloud.gateway.server import load_or_create_signing_key
        from cloud.samples import open_sample_store
        from cloud.updates import SqliteUpdateRegistry

        cfg = cloud.gateway_config()
        samples = open_sample_store(cfg.sample_store, str(cfg.data_dir), cfg.sqlite_synchronous)
        registry = SqliteUpdateRegistry(Path(cfg.data_dir) / "updates", load_or_create_signing_key(cfg))
        return samples, registry
    except Exception:  # reported, and the run's device-side figures still stand
        log.exception("could not open the cloud's stores")
        return None
