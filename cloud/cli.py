"""Command line of the cloud role: `tandem-cloud`."""

from __future__ import annotations

import typer

from common.cli import run_app

app = typer.Typer(name="tandem-cloud", help="Tandem cloud role.", no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """Tandem cloud role."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
