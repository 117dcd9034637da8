"""Command line of the simulation harness: ``tandem-sim``."""

from __future__ import annotations

from pathlib import Path

import typer

from common.cli import run_app
from sim.experiment.cli import experiment_app
from sim.fleet.cli import demo_command, fleet_app
from sim.world_cli import world_app
from sim.zoo_cli import demo_command as zoo_demo_command
from sim.zoo_cli import zoo_app

app = typer.Typer(
    name="tandem-sim",
    help="Tandem simulation: the fleet simulator, the synthetic visual-QA world, the tiny model zoo, experiments.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(fleet_app, name="fleet")
app.add_typer(world_app, name="world")
app.add_typer(zoo_app, name="zoo")
app.add_typer(experiment_app, name="experiment")
zoo_app.command("demo")(zoo_demo_command)
app.command("demo")(demo_command)


@app.callback()
def _root() -> None:
    """Tandem simulation harness."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    run_app(app, argv)


__all__ = ["Path", "app", "main"]

if __name__ == "__main__":
    main()
