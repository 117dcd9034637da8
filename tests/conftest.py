"""Shared pytest fixtures and settings."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# Respect OMP_NUM_THREADS when set (shared machines); otherwise use at most two threads.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``slow`` are skipped unless TANDEM_SLOW=1 (or ``-m slow`` selects them), as the marker says."""
    import pytest

    if os.environ.get("TANDEM_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set TANDEM_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_cli_log_handler_outlives_its_test():
    """A command run in-process (``tandem-device run``, ``tandem-cloud serve``) installs the service's stderr log
    handler on the root logger; remove it after the test, or every later test's stderr carries its lines."""
    yield
    from common.logs import _StderrHandler

    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StderrHandler)]
