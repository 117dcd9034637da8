"""`tandem-sim fleet run | report | list` and `tandem-sim demo`."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

fleet_app = typer.Typer(help="The fleet simulator: a real cloud and many real device agents behind emulated links.")
console = Console(width=None if sys.stdout.isatty() else 160)


@fleet_app.callback(no_args_is_help=True)
def _group() -> None:
    """The fleet simulator: a real cloud and many real device agents behind emulated links."""


def _live_table(snap: dict) -> Table:
    t = Table(title=f"t = {snap['t']:.0f} / {snap['duration']:.0f} s", title_justify="left")
    for h in (
        "device",
        "domain",
        "version",
        "frames",
        "queued",
        "acked",
        "updates",
        "rollbacks",
        "up KB",
        "down KB",
        "acc",
    ):
        t.add_column(h, justify="left" if h in ("device", "domain", "version") else "right")
    rows = snap["devices"]
    for r in rows[:24]:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}"
        counts = [str(r[k]) for k in ("frames", "queued", "acked", "updates", "rollbacks")]
        t.add_row(r["device"], r["domain"], r["version"], *counts, f"{r['up_kb']:,.0f}", f"{r['down_kb']:,.0f}", acc)
    if len(rows) > 24:
        t.caption = f"... and {len(rows) - 24} more devices"
    return t


def run_scenario(
    scenario: str,
    zoo: str | None = None,
    duration: float | None = None,
    out: Path = Path("reports"),
    name: str | None = None,
    drain: float = 20.0,
    executor: str | None = None,
    realtime: bool = False,
    device_profile: str | None = None,
    cloud_profile: str | None = None,
) -> Path:
    """Run a scenario with live progress, write its report, print the summary; returns the report directory."""
    from common.errors import ConfigError
    from sim.fleet.scenario import load_scenario

    sc = load_scenario(scenario, zoo=zoo, duration_s=duration)  # bad input fails before the heavy imports
    if executor is not None:
        if executor not in ("ray", "inprocess"):
            raise ConfigError(f"--executor must be ray or inprocess, not {executor!r}")
        adaptation = {**sc.cloud.get("adaptation", {}), "executor": executor}
        sc = sc.model_copy(update={"cloud": {**sc.cloud, "adaptation": adaptation}})
    from sim.fleet.profiles import cloud_profile as load_cloud_profile
    from sim.fleet.profiles import device_profile as load_device_profile
    from sim.fleet.zoo import resolve_zoo

    dev = load_device_profile(device_profile or sc.device_profile)  # unknown names fail before the run
    cl = load_cloud_profile(cloud_profile or sc.cloud_profile)

    resolve_zoo(sc.zoo, sc.seed)
    from sim.fleet.report import print_summary, write_report
    from sim.fleet.runner import FleetRunner, RunOptions

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    clock = "wall clock (--realtime)" if realtime else f"virtual time, devices {dev.name}, cloud {cl.name}"
    console.print(
        f"fleet run [bold]{sc.name}[/]: {len(sc.devices())} devices, {sc.duration_s:g} s, zoo {sc.zoo}, {clock}"
    )
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        options = RunOptions(
            out_dir=out,
            run_name=name,
            drain_s=drain,
            progress=lambda s: live.update(_live_table(s)),
            realtime=realtime,
            device_profile=device_profile,
            cloud_profile=cloud_profile,
        )
        runner = FleetRunner(sc, options)
        live.update("starting the cloud service and the agents ...")
        result = runner.run()
    run_dir = runner.run_dir()
    paths = write_report(result, run_dir)
    print_summary(result, console)
    console.print(f"report: [bold]{paths['html']}[/] (results.json and the PNG plots beside it)")
    return run_dir


@fleet_app.command("run")
def run_command(
    scenario: str = typer.Argument(..., help="A scenario file, or a name from sim/scenarios/ (see `fleet list`)."),
    zoo: str = typer.Option(None, help="Override the scenario's zoo: reference, micro, or a zoo directory."),
    duration: float = typer.Option(None, help="Override the scenario's duration (seconds)."),
    out: Path = typer.Option(Path("reports"), help="Reports go to OUT/<run>/."),
    name: str = typer.Option(None, help="Run name (default: scenario name and UTC time)."),
    drain: float = typer.Option(20.0, help="Seconds the uplinks may drain after the scenario ends."),
    executor: str = typer.Option(None, help="The cloud trainer's executor: ray (default) or inprocess."),
    realtime: bool = typer.Option(
        False, "--realtime", help="Run on the wall clock (soak tests): figures then describe this host."
    ),
    device_profile: str = typer.Option(
        None, "--device-profile", help="Modelled device hardware (sim/profiles/devices.yaml; `fleet profiles`)."
    ),
    cloud_profile: str = typer.Option(
        None, "--cloud-profile", help="Modelled training cluster (sim/profiles/clouds.yaml; `fleet profiles`)."
    ),
) -> None:
    """Start the cloud service and the scenario's agents, run it on virtual time (default) or the wall clock,
    and write reports/<run>/ (state and report in one directory)."""
    run_scenario(scenario, zoo, duration, out, name, drain, executor, realtime, device_profile, cloud_profile)


@fleet_app.command("profiles")
def profiles_command() -> None:
    """The device and cloud profiles virtual time can model."""
    from sim.fleet.profiles import cloud_profile as load_cloud_profile
    from sim.fleet.profiles import device_profile as load_device_profile
    from sim.fleet.profiles import profile_names

    t = Table("kind", "profile", "figures", "description")
    for n in profile_names("devices"):
        p = load_device_profile(n)
        figures = "host-measured" if p.host else f"{p.fixed_ms:g} ms + {p.per_frame_ms:g} ms/frame"
        t.add_row("device", n, figures, escape(p.description))
    for n in profile_names("clouds"):
        c = load_cloud_profile(n)
        figures = "host-measured" if c.host else (
            f"{c.gpus} GPU, {c.job_overhead_s:g} s/job, teacher {c.teacher_samples_per_s:g}/s, "
            f"learner {c.learner_samples_per_s:g}/s"
        )
        t.add_row("cloud", n, figures, escape(c.description))
    console.print(t)


@fleet_app.command("report")
def report_command(results: Path = typer.Argument(..., help="A results.json written by `fleet run`.")) -> None:
    """Rebuild index.html and the plots from a results.json, and print the summary."""
    from common.errors import ConfigError
    from sim.fleet.report import load_results, print_summary, write_report

    if not results.is_file():
        raise ConfigError(f"results file not found: {results}")
    result = load_results(results)
    paths = write_report(result, results.parent)
    print_summary(result, console)
    console.print(f"report: [bold]{paths['html']}[/]")


@fleet_app.command("list")
def list_command() -> None:
    """The scenario library."""
    from sim.fleet.scenario import SCENARIO_DIR, load_scenario

    t = Table("scenario", "devices", "duration", "description")
    for p in sorted(SCENARIO_DIR.glob("*.yaml")):
        sc = load_scenario(p)
        t.add_row(sc.name, str(len(sc.devices())), f"{sc.duration_s:g} s", sc.description)
    console.print(t)


def demo_command(
    zoo: str = typer.Option(None, help="reference (default: the shipped zoo), micro, or a zoo directory."),
    duration: float = typer.Option(None, help="Override the demo's duration (seconds)."),
) -> None:
    """The demo fleet: 3 devices, 2 shifts, one slow link, a few minutes on the shipped reference zoo."""
    run_scenario("demo", zoo, duration, Path("reports"), None, 20.0)
