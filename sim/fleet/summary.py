"""Fleet aggregates and the issue's targets, computed from a FleetResult (so a saved results.json re-reports)."""

from __future__ import annotations

import math

import numpy as np

from sim.experiment.recovery import MIN_GAP, gap_share
from sim.fleet.results import DeviceResult, FleetResult, Point


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, or None without values."""
    return float(np.percentile(values, q)) if values else None


def _phase_end_point(points: list[Point], start: float, end: float, last: bool) -> Point | None:
    """The last point inside [start, end) ([start, end] for the run's last phase)."""
    inside = [p for p in points if start <= p.t_s and (p.t_s < end or (last and p.t_s <= end))]
    return inside[-1] if inside else None


def phase_recovery(device: DeviceResult) -> list[dict]:
    """Per drift step: the last measurement in it, and the share of the gap to the teacher it recovered."""
    rows = []
    for k, ph in enumerate(device.phases):
        p = _phase_end_point(device.points, ph["start_s"], ph["end_s"], k == len(device.phases) - 1)
        if p is None:
            continue
        gap = p.teacher - p.none
        scored = gap >= MIN_GAP
        rows.append(
            {
                "device": device.device_id,
                "domain": ph["domain"],
                "end_s": p.t_s,
                "accuracy": p.accuracy,
                "none": p.none,
                "teacher": p.teacher,
                "ceiling": p.ceiling,
                "recovery": gap_share(p.accuracy, p.none, p.teacher) if scored else None,
                "ceiling_recovery": gap_share(p.ceiling, p.none, p.teacher) if scored else None,
                "share_of_ceiling": gap_share(p.accuracy, p.none, p.ceiling) if scored else None,
            }
        )
    return rows


def summarize(result: FleetResult) -> dict:
    """Fleet aggregates: accuracy recovery, bytes against references, latencies, losses, rollbacks."""
    devs = result.devices
    fp32 = result.facts.get("fp32_adapter_bytes")
    recov = [r for d in devs for r in phase_recovery(d)]
    scored = [r["recovery"] for r in recov if r["recovery"] is not None]
    shares = [r["share_of_ceiling"] for r in recov if r["share_of_ceiling"] is not None]
    margins = [p.accuracy - p.none for d in devs for p in d.points]
    latencies = [x for d in devs for x in d.latencies_s()]
    applied = sum(len(d.updates) for d in devs)
    up, down = sum(d.up_bytes for d in devs), sum(d.down_bytes for d in devs)
    send_all = sum(d.send_all_bytes for d in devs)
    payload = sum(d.update_payload_bytes for d in devs)
    ask = [x for d in devs for x in d.ask_ms]
    ack = [x for d in devs for x in d.upload_ack_ms]
    return {
        "devices": len(devs),
        "phases": recov,
        "recovery_min": min(scored) if scored else None,
        "recovery_mean": float(np.mean(scored)) if scored else None,
        "share_of_ceiling_min": min(shares) if shares else None,
        "worst_margin_vs_none": min(margins) if margins else None,
        "up_bytes": up,
        "down_bytes": down,
        "send_all_bytes": send_all,
        "uplink_ratio": up / send_all if send_all else None,
        "updates_applied": applied,
        "updates_published": sum(d.published_updates for d in devs),
        "updates_superseded": sum(d.superseded_updates for d in devs),
        "updates_rejected": sum(d.rejected_updates for d in devs),
        "updates_in_flight": sum(
            max(0, d.published_updates - len(d.updates) - d.superseded_updates - d.rejected_updates) for d in devs
        ),
        "downlink_per_update_bytes": down / applied if applied else None,
        "downlink_ratio": down / (applied * fp32) if applied and fp32 else None,
        "update_payload_per_update_bytes": payload / applied if applied else None,
        "update_payload_ratio": payload / (applied * fp32) if applied and fp32 else None,
        "update_latency_s": {q: percentile(latencies, v) for q, v in (("p50", 50), ("p90", 90), ("p99", 99))},
        "update_latency_count": len(latencies),
        "ask_ms": {q: percentile(ask, v) for q, v in (("p50", 50), ("p99", 99))},
        "upload_ack_ms": {q: percentile(ack, v) for q, v in (("p50", 50), ("p99", 99))},
        "frames": sum(d.samples.frames for d in devs),
        "samples_acked": sum(d.samples.acked for d in devs),
        "samples_lost": sum(d.samples.lost for d in devs),
        "samples_stored_twice": sum(d.samples.stored_twice for d in devs),
        "rollbacks": sum(len(d.rollbacks) for d in devs),
        "refused_candidates": sum(d.refused_candidates for d in devs),
        "memory_per_agent_mb": result.facts.get("memory_per_agent_mb"),
    }


def _check(name: str, value: float | None, ok: bool | None, shown: str) -> dict:
    return {"target": name, "value": value, "shown": shown, "met": ok}


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def targets(summary: dict) -> list[dict]:
    """The issue's measurable targets against this run's figures (``met`` is None where not measured)."""
    rec, margin = summary["recovery_min"], summary["worst_margin_vs_none"]
    share = summary.get("share_of_ceiling_min")
    up, down, lost = summary["uplink_ratio"], summary["downlink_ratio"], summary["samples_lost"]
    payload = summary["update_payload_ratio"]
    mem = summary["memory_per_agent_mb"]
    return [
        _check(
            f"recovery >= 65% of the gap on every shift with a gap >= {100 * MIN_GAP:.0f} pt",
            rec,
            None if rec is None else rec >= 0.65,
            _fmt(rec, "{:.0%}"),
        ),
        _check(
            "Tandem >= 90% of the true-label ceiling's gain on every scored shift",
            share,
            None if share is None else share >= 0.9,
            _fmt(share, "{:.0%}"),
        ),
        _check(
            "no measurement > 1 point below no adaptation",
            margin,
            None if margin is None else margin >= -0.01,
            _fmt(None if margin is None else margin * 100, "{:+.1f} pt"),
        ),
        _check("uplink <= 20% of send-everything", up, None if up is None else up <= 0.20, _fmt(up, "{:.1%}")),
        _check(
            "downlink <= 1/20 of the fp32 adapter per update (all the link carried)",
            down,
            None if down is None else down <= 0.05,
            _fmt(down, "{:.3f}"),
        ),
        _check(
            "update payload <= 1/20 of the fp32 adapter",
            payload,
            None if payload is None else payload <= 0.05,
            _fmt(payload, "{:.3f}"),
        ),
        _check("0 acked samples lost", lost, lost == 0, str(lost)),
        _check(
            "memory per agent beyond shared weights <= 30 MB",
            mem,
            None if mem is None else mem <= 30,
            _fmt(mem, "{:.1f} MB"),
        ),
    ]
