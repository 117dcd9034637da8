"""Command line of the device role: `tandem-device`."""

from __future__ import annotations

import typer

from common.cli import run_app

app = typer.Typer(
    name="tandem-device", help="Tandem device role.", no_args_is_help=True, add_completion=False
)


@app.callback()
def _root() -> None:
    """Tandem device role."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
