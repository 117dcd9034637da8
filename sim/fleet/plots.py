"""The report's plots: accuracy over time against the references, bytes per device, update-latency CDF."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from sim.fleet.results import DeviceResult, FleetResult

MAX_PANELS = 12
"""Up to this many devices get a panel each; larger fleets get one panel per group (means)."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(result: FleetResult) -> list[tuple[str, list[DeviceResult]]]:
    if len(result.devices) <= MAX_PANELS:
        return [(d.device_id, [d]) for d in result.devices]
    groups: dict[str, list[DeviceResult]] = defaultdict(list)
    for d in result.devices:
        groups[d.group].append(d)
    return [(f"{g} (mean of {len(ds)})", ds) for g, ds in list(groups.items())[:MAX_PANELS]]


def _mean_curve(devices: list[DeviceResult], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean of a point field over devices at the first device's times (devices are sampled together)."""
    n = min(len(d.points) for d in devices)
    t = np.array([p.t_s for p in devices[0].points[:n]])
    v = np.array([[getattr(p, key) for p in d.points[:n]] for d in devices]).mean(axis=0)
    return t, v


def plot_accuracy(result: FleetResult, path: Path) -> None:
    """Accuracy on held-out samples of the current domain over time, per device (or group), with the
    no-adaptation and teacher references; dotted lines mark drift steps, ticks mark applied updates."""
    plt = _plt()
    panels = [(title, ds) for title, ds in _panels(result) if all(d.points for d in ds)]
    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, (title, ds) in zip(axes.flat, panels):
        for key, label, style in (
            ("teacher", "teacher", "--"),
            ("accuracy", "Tandem", "-"),
            ("none", "no adaptation", ":"),
        ):
            t, v = _mean_curve(ds, key)
            ax.plot(t, 100 * v, style, label=label, lw=1.6 if key == "accuracy" else 1.2)
        for ph in ds[0].phases[1:]:
            ax.axvline(ph["start_s"], color="grey", lw=0.6, ls=":")
        if len(ds) == 1:
            for u in ds[0].updates:
                ax.plot([u.t_s], [0.04], marker="|", color="tab:green", ms=10, transform=ax.get_xaxis_transform())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("held-out accuracy (%)")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(result: FleetResult, path: Path) -> None:
    """Uplink and downlink bytes per device (measured on the links), with the send-everything uplink."""
    plt = _plt()
    devs = result.devices
    x = np.arange(len(devs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(devs) + 3), 3.6))
    w = 0.4
    ax.bar(x - w / 2, [d.up_bytes / 1e6 for d in devs], w, label="uplink (link)")
    ax.bar(x + w / 2, [d.down_bytes / 1e6 for d in devs], w, label="downlink (link)")
    ax.plot(x, [d.send_all_bytes / 1e6 for d in devs], "k_", ms=10, label="send-everything uplink")
    ax.set_yscale("log")
    ax.set_ylabel("MB")
    ax.set_xticks(x)
    ax.set_xticklabels([d.device_id for d in devs], rotation=70, fontsize=6 if len(devs) > 30 else 8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdf(result: FleetResult, path: Path) -> None:
    """CDF of capture-to-applied update latency, per cohort and for the fleet."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    cohorts: dict[str, list[float]] = defaultdict(list)
    for d in result.devices:
        cohorts[d.cohort or d.group].extend(d.latencies_s())
    every = sorted(x for xs in cohorts.values() for x in xs)
    series = [(f"fleet ({len(every)})", every)]
    if len(cohorts) > 1:
        series += [(f"{c} ({len(xs)})", sorted(xs)) for c, xs in cohorts.items()]
    for label, xs in series:
        if xs:
            ax.step(
                xs,
                np.arange(1, len(xs) + 1) / len(xs),
                where="post",
                label=label,
                lw=2 if label.startswith("fleet") else 1,
            )
    if not every:
        ax.text(0.5, 0.5, "no update was applied", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("capture -> update applied (s)")
    ax.set_ylabel("share of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"accuracy": plot_accuracy, "bytes": plot_bytes, "latency_cdf": plot_latency_cdf}


def write_plots(result: FleetResult, out_dir: Path) -> dict[str, Path]:
    """Every plot as ``<name>.png`` in ``out_dir``."""
    paths = {}
    for name, fn in PLOTS.items():
        paths[name] = out_dir / f"{name}.png"
        fn(result, paths[name])
    return paths
