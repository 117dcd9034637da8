"""requirements.lock pins every dependency exactly, from a package index, and covers what pyproject.toml asks for."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^ ;]*)$")


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock line is not an exact pin from an index: {line!r}"
        pins[_name(match.group(1))] = match.group(2)
    return pins


def declared() -> list[str]:
    """Every requirement of pyproject.toml: dependencies and every extra (read without tomllib: Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    text = text[text.index("[project]") : text.index("[project.scripts]")]
    found = []
    for block in re.findall(r"^(?:dependencies|[a-z]+) = \[(.*?)\]", text, flags=re.S | re.M):
        found += re.findall(r'"([^"]+)"', block)
    return [r for r in found if not r.startswith(("setuptools", "wheel"))]


def test_every_lock_line_is_an_exact_pin():
    pins = locked()
    assert pins["torch"] == "2.13.0"  # the local CPU wheel; any other version pulls GBs of CUDA packages
    assert "tandem-mllm" not in pins  # the project itself never goes into the lock (no checkout paths)


def test_the_lock_covers_every_declared_requirement():
    pins = locked()
    missing = sorted({_name(r) for r in declared()} - set(pins))
    assert not missing, f"pyproject.toml requirements missing from requirements.lock (run make lock): {missing}"
