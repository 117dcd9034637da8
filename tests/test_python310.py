"""The code stays valid Python 3.10 (JetPack 6 ships 3.10): every module compiles under a 3.10 interpreter."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["common", "protocol", "device", "cloud", "sim", "bench"]


def find_python310() -> str | None:
    """A working Python 3.10 interpreter: on the PATH, or one pyenv installed (its shim may not be active)."""
    candidates = [shutil.which("python3.10"), *sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))]
    for candidate in filter(None, candidates):
        proc = subprocess.run([str(candidate), "--version"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.startswith("Python 3.10"):
            return str(candidate)
    return None


def test_every_module_compiles_under_python_3_10():
    python310 = find_python310()
    if python310 is None:
        pytest.skip("no working python3.10 interpreter on this machine")
    files = [str(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    script = (
        "import sys\n"
        "bad = []\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        compile(open(f, encoding='utf-8').read(), f, 'exec')\n"
        "    except SyntaxError as e:\n"
        "        bad.append(f'{f}:{e.lineno}: {e.msg}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([python310, "-c", script, *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
