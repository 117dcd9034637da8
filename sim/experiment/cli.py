"""`tandem-sim experiment offline`: the offline continual-adaptation experiment."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

experiment_app = typer.Typer(help="Offline experiments of the learning core.", no_args_is_help=True)


@experiment_app.callback()
def _group() -> None:
    """Offline experiments of the learning core (UTS, AKD, DWC)."""


@experiment_app.command("offline")
def offline(
    size: str = typer.Option(
        "quick", help="quick (a few minutes), full (the complete drift, <= 15 min) or rates (the rate-recovery arms)"
    ),
    recipe: str = typer.Option(None, help="zoo recipe: base (default), micro, or micro-random (untrained)"),
    seed: int = typer.Option(None, help="world and zoo seed"),
    zoo_dir: str = typer.Option(None, help="a built zoo directory (teacher/, device/) instead of the recipe's"),
    out: Path = typer.Option(Path("reports/offline"), help="directory for table.md, plot.png, results.json"),
    threads: int = typer.Option(None, help="torch threads"),
    dwc_selection: str = typer.Option(
        None, help="how DWC ranks adapter units: energy (default; delta energy) or impact (effect on the layer)"
    ),
    rate_arms: str = typer.Option(
        None, help="rate-recovery arms, comma-separated (jpeg50,jpeg90,all_int8,r8b4,...), or 'default'"
    ),
    baselines: str = typer.Option(
        None, help="baselines, comma-separated (ceiling,send_all,fp32,ce_only), or 'none'"
    ),
    setting: list[str] = typer.Option(
        [],
        "--set",
        help="override one setting, KEY=VALUE (YAML value; dotted keys reach into akd, e.g. akd.lr=6e-3, "
        "replay_rounds=1, baselines=[ceiling]); repeatable",
    ),
) -> None:
    """Device pretrained on clear, stream drifting through shifts; UTS + AKD + DWC against baselines."""
    from sim.experiment.config import parse_overrides, sized
    from sim.experiment.rate_arms import DEFAULT_RATE_ARMS
    from sim.experiment.report import print_report, write_reports
    from sim.experiment.runner import run_experiment

    overrides = parse_overrides(setting)
    if rate_arms is not None:
        overrides["rate_arms"] = DEFAULT_RATE_ARMS if rate_arms == "default" else _names(rate_arms)
    if baselines is not None:
        overrides["baselines"] = [] if baselines == "none" else _names(baselines)
    config = sized(
        size,
        recipe,
        seed=seed,
        threads=threads,
        zoo_dir=zoo_dir,
        dwc_selection=dwc_selection,
        **overrides,
    )
    console = Console()
    with console.status("running the offline experiment") as status:
        result = run_experiment(config, progress=lambda line: (console.log(line), status.update(line)))
    print_report(result, console)
    paths = write_reports(result, out)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    from common.cli import run_app

    run_app(experiment_app)
