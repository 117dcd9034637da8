"""Test-only fault injection: a process kills itself with SIGKILL at a named point of a crash window.

Crash-consistency tests need a kill -9 that lands exactly inside a window (between publishing an update and
committing the job, between writing an adapter version and swapping HEAD, between storing samples and acking
them), not wherever a timer happens to fire. The roles mark those windows with ``fault_point(name)``.

A point acts only when the process runs with ``TANDEM_TEST_FAULTS=1`` (the test flag; deployments never set
it) and ``TANDEM_FAULT_FILE`` names a file that arms it. The file can be written before the process starts or
while it runs, so a test arms a point at the moment it wants. Its words say what to do:

- ``<name>``: kill. The file is removed (the restarted process runs on), the point's name is written to
  ``<file>.fired`` (the test checks which point fired) and the process sends itself SIGKILL: no handler, no
  flush, no cleanup runs.
- ``hold:<name>``: a gate. The process writes ``<name> <pid>`` to ``<file>.held`` and waits there until the
  file no longer holds the point, so a test can act (kill the process, say) while a job is surely mid-way,
  however fast the machine.

Points: ``cloud.after_publish`` (cloud/adaptation/service.py: between publish and commit), ``cloud.job_round``
(cloud/adaptation/worker.py: a job's labels are in, its training round starts), ``gateway.after_store``
(cloud/gateway/servicer.py: between store and ack), ``agent.before_head_swap`` and ``agent.after_head_swap``
(device/agent/store.py: the new version is written and HEAD still names the old; HEAD names the new, the
agent's update state and the cloud do not know yet).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

TEST_FLAG = "TANDEM_TEST_FAULTS"
FAULT_FILE = "TANDEM_FAULT_FILE"
HOLD_LIMIT_S = 600.0  # a held point lets go by itself after this long


def _words() -> tuple[Path, list[str]] | None:
    if os.environ.get(TEST_FLAG) != "1" or not os.environ.get(FAULT_FILE):
        return None
    path = Path(os.environ[FAULT_FILE])
    try:
        return path, path.read_text().split()
    except FileNotFoundError:
        return None


def fault_point(name: str) -> None:
    """Kill or hold this process here if a test armed ``name``; otherwise do nothing."""
    found = _words()
    if found is None:
        return
    path, words = found
    if f"hold:{name}" in words:
        _hold(path, name)
    elif name in words:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".fired").write_text(name)
        os.kill(os.getpid(), signal.SIGKILL)


def _hold(path: Path, name: str) -> None:
    path.with_name(path.name + ".held").write_text(f"{name} {os.getpid()}")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < deadline:
        found = _words()
        if found is None or f"hold:{name}" not in found[1]:
            return
        time.sleep(0.02)


def fault_env(fault_file: str | Path) -> dict[str, str]:
    """Environment entries that let a child process honour the fault file (for tests)."""
    return {TEST_FLAG: "1", FAULT_FILE: str(fault_file)}
