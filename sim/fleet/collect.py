"""Turn what the probes, links and the cloud's stores recorded into a FleetResult."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sim.fleet.cloud_process import CloudProcess
from sim.fleet.devices import SimDevice
from sim.fleet.results import DeviceResult, FleetResult, SampleCounts, UpdateApplied
from sim.fleet.scenario import Scenario

log = logging.getLogger("tandem.sim.fleet")


def _phases(d: SimDevice, duration: float) -> list[dict]:
    drift = d.spec.drift
    return [
        {"domain": s.domain, "start_s": s.at_s, "end_s": drift.phase_end(i, duration)}
        for i, s in enumerate(drift.steps)
    ]


@dataclass
class CloudRecords:
    """What the cloud's stores say after the run."""

    stored: dict[str, set[int]] = field(default_factory=dict)
    """Device id -> the seqs in the sample store."""
    published: dict[str, list[int]] = field(default_factory=dict)
    """Device id -> ids of the updates addressed to it or its cohort."""
    upto: dict[int, dict[str, int]] = field(default_factory=dict)
    """Update id -> device id -> the highest seq of that device its job trained on."""
    sizes: dict[int, int] = field(default_factory=dict)
    """Update id -> its payload's bytes."""
    refused: dict[str, int] = field(default_factory=dict)
    """Device id -> candidates the validation gate refused for it (its own or its cohort's jobs)."""
    jobs: dict[str, int] = field(default_factory=dict)
    """Jobs by outcome / state."""


def _updates(d: SimDevice, upto: dict[int, dict[str, int]], held_out_every: int) -> list[UpdateApplied]:
    """Applied updates with the capture-to-applied latency of each sample they were the first to learn from (the
    cloud trains on a job's samples except every ``held_out_every``-th seq, which it holds out for its gate)."""
    data = d.probe.data
    covered = 0
    out = []
    for a in data.applied:
        top = upto.get(a.update_id, {}).get(d.spec.device_id, 0) if a.update_id is not None else 0
        lat = [a.t_s - q.captured_s for s, q in data.queued.items() if covered < s <= top and s % held_out_every]
        covered = max(covered, top)
        out.append(UpdateApplied(t_s=a.t_s, version=a.version, latencies_s=sorted(lat)))
    return out


def collect_results(run: str, sc: Scenario, devices: list[SimDevice], cloud: CloudProcess, facts: dict) -> FleetResult:
    """Per-device results, checked against the cloud's sample store and update registry."""
    cloud_records = read_cloud(cloud, [(d.spec.device_id, d.spec.cohort) for d in devices])
    facts["cloud_jobs"] = cloud_records.jobs if cloud_records else None
    send_all = facts.get("send_all_sample_bytes", 0)
    held_out_every = int(cloud.config.get("adaptation", {}).get("gate", {}).get("held_out_every", 5))
    out = []
    for d in devices:
        data = d.probe.data
        did = d.spec.device_id
        rec = cloud_records or CloudRecords()
        stored_seqs = rec.stored.get(did, set())
        published = rec.published.get(did, [])
        updates = _updates(d, rec.upto, held_out_every)
        acked = [s for s, q in data.queued.items() if q.acked_s is not None]
        applied_ids = {a.update_id for a in data.applied if a.update_id is not None}
        rejected = [o for o in d.agent.link.fetcher.outcomes if not o.applied] if d.agent.link else []
        last_applied = max(applied_ids, default=0)
        superseded = [i for i in published if i not in applied_ids and i < last_applied]
        refused_by_device = [o.update_id for o in rejected]
        out.append(
            DeviceResult(
                device_id=did,
                group=d.spec.group,
                cohort=d.spec.cohort,
                link=d.spec.link.model_dump(mode="json"),
                points=d.points,
                updates=updates,
                rollbacks=data.rollbacks,
                refused_candidates=rec.refused.get(did, 0),
                published_updates=len(published),
                superseded_updates=len(superseded),
                rejected_updates=len(refused_by_device),
                samples=SampleCounts(
                    frames=d.source.emitted,
                    selected=len(data.queued),
                    acked=len(acked),
                    stored=len(stored_seqs),
                    stored_twice=0,
                    pending=len(data.queued) - len(acked),
                    lost=len([s for s in acked if s not in stored_seqs]) if cloud_records is not None else 0,
                ),
                up_bytes=d.proxy.stats.bytes_up,
                down_bytes=d.proxy.stats.bytes_down,
                update_payload_bytes=sum(rec.sizes.get(i, 0) for i in applied_ids),
                link_stats={k: getattr(d.proxy.stats, k) for k in ("connections", "refused", "cuts", "retransmits")},
                send_all_bytes=int(send_all * d.source.emitted),
                ask_ms=data.ask_ms,
                upload_ack_ms=data.upload_ack_ms,
                phases=_phases(d, sc.duration_s),
            )
        )
        facts.setdefault("updates_rejected_by_devices", 0)
        facts["updates_rejected_by_devices"] += len(rejected)
    return FleetResult(run=run, scenario=sc.model_dump(mode="json"), devices=out, facts=facts)


def read_cloud(cloud: CloudProcess, devices: list[tuple[str, str]]) -> CloudRecords | None:
    """Open the cloud's sample store, update registry and job store (after the service stopped)."""
    try:
        from cloud.gateway.server import load_or_create_signing_key
        from cloud.stores import open_job_store, open_sample_store, open_update_registry

        cfg = cloud.gateway_config()
        samples = open_sample_store(cfg, cfg.data_dir, cfg.sqlite_synchronous)
        registry = open_update_registry(cfg, cfg.data_dir, load_or_create_signing_key(cfg), cfg.sqlite_synchronous)
        jobs = open_job_store(cfg, cfg.adaptation_dir, cfg.sqlite_synchronous)
    except Exception:  # reported; the run's device-side figures still stand
        log.exception("could not open the cloud's stores")
        return None
    rec = CloudRecords()
    try:
        for did, cohort in devices:
            rec.stored[did] = {s.seq for s in samples.iter_samples(did)}
            records = registry.for_device(did, cohort)
            rec.published[did] = [r.update_id for r in records]
            rec.sizes.update({r.update_id: r.size for r in records})
        cohort_of = dict(devices)
        for job in jobs.list(limit=1_000_000):
            key = job.outcome if job.state == "done" else job.state
            rec.jobs[key] = rec.jobs.get(key, 0) + 1
            if job.update_id:
                rec.upto[job.update_id] = {r.device_id: r.upto_seq for r in job.ranges}
            if job.outcome == "refused":
                members = (
                    [r.device_id for r in job.ranges]
                    if job.subject_kind == "device"
                    else [did for did, c in cohort_of.items() if c == job.subject]
                )
                for did in set(members):
                    rec.refused[did] = rec.refused.get(did, 0) + 1
    finally:
        for store in (samples, registry, jobs):
            store.close()
    return rec
