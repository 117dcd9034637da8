"""The one line every benchmark ends with (the protocol is described in ``bench/__main__.py``)."""

from __future__ import annotations

from collections.abc import Iterable

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def verdict(name: str, checks: Iterable[tuple[bool, str]]) -> int:
    """Print ``VERDICT <name>: PASS|FAIL <reason>`` from ``(met, what)`` checks; returns the exit code (1 on FAIL).

    The reason lists the missed checks on FAIL, every check on PASS."""
    checks = list(checks)
    missed = [what for ok, what in checks if not ok]
    status = FAIL if missed or not checks else PASS
    reason = "; ".join(missed) if missed else "; ".join(what for _, what in checks)
    print(f"VERDICT {name}: {status} {reason or 'no checks'}", flush=True)
    return 1 if status == FAIL else 0


def skipped(name: str, reason: str) -> int:
    """Print ``VERDICT <name>: SKIP <reason>`` (nothing was measured, e.g. no GPU); exit code 0."""
    print(f"VERDICT {name}: {SKIP} {reason}", flush=True)
    return 0
