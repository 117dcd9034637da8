"""Shared plumbing for the transport benchmarks: a gateway subprocess and a result table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
console = Console()


@contextmanager
def gateway_subprocess(data_dir: Path, *extra: str, timeout: float = 60.0):
    """Run ``python -m cloud.cli serve`` on an ephemeral port; yields ``host:port``."""
    ready = data_dir.parent / "gateway.ready"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "cloud.cli",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--log-level",
        "WARNING",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)
        yield ready.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print a rich table."""
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
