"""Shared CLI plumbing: every console script turns a TandemError into one line on stderr and exit code 1."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from common.errors import TandemError

err_console = Console(stderr=True, highlight=False)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; user errors become ``error: <reason>`` and exit 1, without a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except TandemError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
