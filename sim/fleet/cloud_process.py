"""The real cloud service (``tandem-cloud serve``: gateway, scheduler, local Ray) as a child process of the
harness, and read access to its stores once it has stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from common.errors import TandemError


class CloudProcess:
    """Start ``tandem-cloud serve`` with a generated config; ``address`` is its gateway once ready."""

    def __init__(self, directory: Path, overrides: dict[str, Any] | None = None, threads: int = 1) -> None:
        self.directory = directory
        self.config_path = directory / "cloud.yaml"
        self.ready_file = directory / "ready"
        self.log_path = directory / "cloud.log"
        self.config: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "data_dir": str(directory / "data")}
        self.config.update(overrides or {})
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "cloud.cli", "serve", "--config", str(self.config_path),
                "--ready-file", str(self.ready_file), "--log-level", "INFO"]  # fmt: skip

    async def start(self, timeout_s: float = 180.0) -> str:
        """Launch and wait until the gateway serves; returns ``host:port``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.ready_file.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.is_file() and self.ready_file.read_text().strip():
                self.address = self.ready_file.read_text().strip()
                return self.address
            if self.proc.poll() is not None:
                raise TandemError(f"the cloud service exited with code {self.proc.returncode}: {self._log_tail()}")
            await asyncio.sleep(0.2)
        await self.stop()
        raise TandemError(f"the cloud service did not become ready in {timeout_s:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1][:300] if lines else "(no output)"
        return "(no log)"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the service's graceful stop: Ray included), then SIGKILL of its process group after
        ``grace_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def gateway_config(self):
        """The service's config as the cloud package reads it (for opening its stores)."""
        from cloud.config import GatewayConfig
        from common.config import load_config

        return load_config(GatewayConfig, self.config_path)
