"""A CLI start that quantizes nothing prints no third-party warning; asking for quantization shows them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from common.modeling import (
    _BNB_CPU_LOGGER,
    _BNB_NOTICE,
    hold_bitsandbytes_notices,
    quantization_config,
)

CLI = "import sys; from sim.cli import main; sys.argv[0] = 'tandem-sim'; main()"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["world", "sample", "-n", "1"], "question"),
        # loads both shipped models: no "Loading weights" bars or other third-party output either
        (["zoo", "eval", "--samples", "2", "--domain", "clear", "--qtype", "color"], "accuracy"),
    ],
)
def test_cli_start_prints_no_third_party_warning(argv: list[str], expected: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, env=env, timeout=280)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout
    assert _BNB_NOTICE not in out.stderr
    assert "warn" not in out.stderr.lower(), out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_held_notice_is_shown_once_quantization_is_asked_for(caplog) -> None:
    pytest.importorskip("bitsandbytes")
    hold_bitsandbytes_notices()
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning("%s from kernels-community: test", _BNB_NOTICE)
        logger.warning("another bitsandbytes warning")
        assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
        quantization_config("4bit")
        assert caplog.records[-1].getMessage() == f"{_BNB_NOTICE} from kernels-community: test"
    hold_bitsandbytes_notices()  # back to the state every process starts in
