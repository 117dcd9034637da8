"""What a run simulated, as a report shows it: the clock, the modelled hardware, virtual and wall time."""

from __future__ import annotations

from sim.fleet.results import FleetResult


def _profile(p: dict | None, kind: str) -> str:
    if not p:
        return "n/a"
    if p.get("host"):
        return f"{p.get('name', 'host')}: host-measured"
    if kind == "device":
        return f"{p.get('name')}: {p.get('fixed_ms'):g} ms + {p.get('per_frame_ms'):g} ms per frame"
    return (
        f"{p.get('name')}: {p.get('gpus')} GPU, {p.get('job_overhead_s'):g} s per job, teacher "
        f"{p.get('teacher_samples_per_s'):g} samples/s, learner {p.get('learner_samples_per_s'):g} sample-epochs/s"
    )


def simulation_lines(result: FleetResult) -> list[tuple[str, str]]:
    """(label, value) rows: clock, profiles, virtual duration, wall time, slowdown, safety timeouts."""
    f = result.facts
    virtual = f.get("clock") == "virtual"
    clock = "virtual (the figures model the profiles)" if virtual else "wall (the figures describe this host)"
    rows = [("clock", clock)]
    if virtual:
        rows += [
            ("device profile", _profile(f.get("device_profile"), "device")),
            ("cloud profile", _profile(f.get("cloud_profile"), "cloud")),
        ]
    vs, measure_wall = f.get("virtual_s"), f.get("measure_wall_s")
    rows.append(("scenario time", "n/a" if vs is None else f"{vs:.0f} s (with the drain)"))
    rows.append(("wall time", f"{f.get('wall_s', 0):.0f} s (set-up {f.get('setup_s', 0):.0f} s)"))
    if measure_wall is not None and result.scenario.get("duration_s"):
        rows.append(("slowdown", f"{measure_wall / float(result.scenario['duration_s']):.2f} wall s per scenario s"))
    lock = f.get("lockstep")
    if lock:
        held = ", ".join(f"{k} {v}" for k, v in sorted(lock.get("held", {}).items())) or "none"
        rows += [
            ("safety timeouts fired", str(lock.get("safety_timeouts", 0))),
            ("time steps", f"{lock.get('steps', 0)} (waits on: {held})"),
            ("waiting for jobs to finish here", f"{lock.get('barrier_wall_s', 0):.0f} s of wall time"),
        ]
    return rows
