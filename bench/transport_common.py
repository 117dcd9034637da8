"""Shared plumbing for the transport benchmarks: a gateway subprocess and a result table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
console = Console()


@contextmanager
def gateway_process(
    data_dir: Path,
    *extra: str,
    timeout: float = 120.0,
    settings: dict | None = None,
    stderr_path: Path | None = None,
):
    """``python -m cloud.cli serve`` as a subprocess on an ephemeral port; yields (process, address).

    ``settings`` are GatewayConfig keys written to a config file beside ``data_dir`` (open enrollment unless
    they say otherwise); ``stderr_path`` collects the gateway's log instead of a pipe.
    """
    ready = data_dir.parent / f"{data_dir.name}.ready"
    ready.unlink(missing_ok=True)
    config = data_dir.parent / f"{data_dir.name}.yaml"
    config.write_text(yaml.safe_dump({"open_enrollment": True, **(settings or {})}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "cloud.cli",
        "serve",
        "--config",
        str(config),
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
    log = open(stderr_path, "w") if stderr_path is not None else subprocess.PIPE  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=log, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                why = proc.stderr.read() if proc.stderr else Path(stderr_path or "").read_text()
                raise RuntimeError(f"gateway exited early: {why}")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not become ready")
            time.sleep(0.05)
        yield proc, ready.read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if stderr_path is not None:
            log.close()


def sample_payload(i: int = 0, size: int = 4096) -> bytes:
    """A valid uploaded sample (``tandem.uts.sample/1``) of about ``size`` bytes, different for each ``i``."""
    import torch

    from common.sample_codec import UploadSample, encode_sample

    dim = 64
    k = max(1, (size - 600) // (dim + 4))  # int8 codes, fp16 scale and int16 index per token
    if k + 1 >= 32768:
        k = (size - 600) // (dim + 6)  # int32 indices from 32768 patches on
    g = torch.Generator().manual_seed(i)
    return encode_sample(
        UploadSample(
            features=torch.randn(k, dim, generator=g),
            patch_indices=torch.arange(k),
            num_patches=k + 1,
            question=f"sample {i}: what colour is the circle ?",
            answer_ids=torch.tensor([i % 1000, 3]),
            answer_probs=torch.tensor([0.6, 0.3]),
            uncertainty={"entropy": 0.5},
        )
    )


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print a rich table."""
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
