"""What a simulated device costs the host: wall seconds per virtual second and memory per agent at 1, 10, 100
(and with ``--devices 1000``, 1,000) devices, on virtual time.

``python -m bench.fleet_scale [--quick] [--zoo micro|reference] [--virtual-s S] [--devices 1,10,100]``

Each size runs the same kind of fleet (four cohorts on wifi, LTE, 3G and satellite links, 0.25 frames/s per
device, a clear-to-night drift) for the same virtual duration. The slowdown (wall / virtual) depends on this
host and its load, so it is printed with the load average; the verdict is on memory per agent beyond the shared
weights (the fleet simulator's budget: 10 MB), which does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

MEMORY_TARGET_MB = 10.0
LINKS = ("wifi", "lte", "3g", "satellite")


def scenario(devices: int, virtual_s: float, zoo: str) -> dict:
    per = [devices // 4 + (1 if i < devices % 4 else 0) for i in range(4)]
    groups = [
        {"name": f"g{i}", "count": n, "cohort": f"c{i}", "link": LINKS[i], "request_rate_hz": 0.25,
         "uplink_budget": {"budget": 6, "period_s": 60},
         "drift": [{"at_s": 0, "domain": "clear"}, {"at_s": virtual_s / 2, "domain": "night"}]}
        for i, n in enumerate(per) if n
    ]  # fmt: skip
    return {
        "name": f"scale-{devices}",
        "duration_s": virtual_s,
        "zoo": zoo,
        "measure_every_s": virtual_s / 2,
        "eval_samples": 8,
        "cloud": {"adaptation": {"executor": "inprocess"}},
        "groups": groups,
    }


def run_one(devices: int, virtual_s: float, zoo: str, out: Path) -> dict:
    import yaml

    from sim.fleet.runner import FleetRunner, RunOptions
    from sim.fleet.scenario import load_scenario
    from sim.fleet.summary import summarize

    path = out / f"scale-{devices}.yaml"
    path.write_text(yaml.safe_dump(scenario(devices, virtual_s, zoo)))
    options = RunOptions(out_dir=out, run_name=f"scale-{devices}", drain_s=10, ceiling=False)  # cost, not accuracy
    runner = FleetRunner(load_scenario(path), options)
    started = time.perf_counter()
    result = runner.run()
    s = summarize(result)
    f = result.facts
    return {
        "devices": devices,
        "wall_per_virtual": f["measure_wall_s"] / virtual_s,
        "setup_s": f["setup_s"],
        "wall_s": time.perf_counter() - started,
        "memory_per_agent_mb": f["memory_per_agent_mb"],
        "frames": s["frames"],
        "acked": s["samples_acked"],
        "lost": s["samples_lost"],
        "safety_timeouts": f["lockstep"]["safety_timeouts"],
        "rows_per_forward": f.get("rows_per_forward", 0.0),
        "settle_wall_s": f["lockstep"]["settle_wall_s"],
        "barrier_wall_s": f["lockstep"]["barrier_wall_s"],
        "cloud_wall_s": f["lockstep"]["cloud_wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 and 10 devices, 30 virtual seconds, micro zoo")
    ap.add_argument("--zoo", default=None, help="micro (default with --quick) or reference")
    ap.add_argument("--virtual-s", type=float, default=None, help="virtual seconds per size (default 60; 30 quick)")
    ap.add_argument("--devices", default=None, help="comma-separated sizes (default 1,10,100; 1,10 quick)")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in (args.devices or ("1,10" if args.quick else "1,10,100")).split(",")]
    virtual_s = args.virtual_s or (30.0 if args.quick else 60.0)
    zoo = args.zoo or ("micro" if args.quick else "reference")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-fleet-scale-") as tmp:
        for n in sizes:
            load = os.getloadavg()[0]
            row = run_one(n, virtual_s, zoo, Path(tmp))
            row["load"] = load
            rows.append(row)
            print(
                f"{n:>5} devices: {row['wall_per_virtual']:.2f} wall s per virtual s, "
                f"{row['memory_per_agent_mb']:.1f} MB per agent, set-up {row['setup_s']:.0f} s, "
                f"{row['frames']} frames, {row['acked']} acked, {row['lost']} lost, "
                f"{row['safety_timeouts']} safety timeouts; {row['rows_per_forward']:.1f} frames per batched "
                f"forward; wall s waiting for the host to settle {row['settle_wall_s']:.0f}, for jobs due "
                f"{row['barrier_wall_s']:.0f}, for the cloud's turns {row['cloud_wall_s']:.0f} "
                f"(load average {load:.1f} at start)",
                flush=True,
            )
    biggest = max(rows, key=lambda r: r["devices"])
    ok_memory = all(r["memory_per_agent_mb"] <= MEMORY_TARGET_MB for r in rows if r["devices"] >= 10)
    ok_lost = all(r["lost"] == 0 and r["safety_timeouts"] == 0 for r in rows)
    ok = ok_memory and ok_lost
    verdict = "PASS" if ok else "FAIL"
    print(
        f"VERDICT fleet_scale: {verdict} memory per agent at {biggest['devices']} devices "
        f"{biggest['memory_per_agent_mb']:.1f} MB (target <= {MEMORY_TARGET_MB:g} MB from 10 devices up); "
        f"{'0 lost' if ok_lost else 'samples lost or safety timeouts'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
