"""The test-only fault points (common/faults.py) in real child processes: inert without the test flag or when not
armed, a real SIGKILL when armed (once: the file is consumed), a gate that holds until the test lets go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.faults import TEST_FLAG, fault_env

ROOT = Path(__file__).resolve().parents[1]
CHILD = "from common.faults import fault_point; fault_point('demo.point'); print('after the point', flush=True)"


def _child(env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def test_a_point_kills_only_when_the_test_flag_is_set_and_the_file_arms_it(tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("demo.point")
    inert = _child({**fault_env(fault), TEST_FLAG: "0"})  # a deployment never sets the flag
    assert inert.communicate(timeout=60)[0] == "after the point\n" and inert.returncode == 0
    other = tmp_path / "other"
    other.write_text("another.point")
    unarmed = _child(fault_env(other))
    assert unarmed.communicate(timeout=60)[0] == "after the point\n" and unarmed.returncode == 0
    armed = _child(fault_env(fault))
    assert armed.communicate(timeout=60)[0] == "" and armed.returncode == -signal.SIGKILL
    assert not fault.exists() and Path(f"{fault}.fired").read_text() == "demo.point"
    again = _child(fault_env(fault))  # consumed: the restarted process runs on
    assert again.communicate(timeout=60)[0] == "after the point\n" and again.returncode == 0


def test_a_held_point_waits_until_the_test_lets_go(tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("hold:demo.point")
    proc = _child(fault_env(fault))
    held = Path(f"{fault}.held")
    deadline = time.monotonic() + 60
    while not held.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held.read_text() == f"demo.point {proc.pid}"
    time.sleep(0.3)
    assert proc.poll() is None  # still held
    fault.unlink()
    assert proc.communicate(timeout=60)[0] == "after the point\n" and proc.returncode == 0
