"""Optional TorchInductor compilation of the zoo's answer-training stages (``tandem-sim zoo build --compile``).

Measured on the 2-core build machine (same day, base geometry): teacher steps 228 ms against 250 ms eager, device
steps 113 ms against 151 ms, after 10-30 s of compiling per stage; vision pretraining gained nothing, so it stays
eager. Off by default: compiled kernels round differently, so a compiled build's weights differ slightly from the
eager build the published figures come from (the manifest records whether a build was compiled). The compiled
wrapper lives only while a stage trains, so the saved models are plain transformers modules.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def compiler_available() -> bool:
    """Whether TorchInductor can build CPU kernels here (it needs a C++ compiler on the PATH)."""
    return any(shutil.which(name) for name in ("g++", "clang++", "c++"))


@contextmanager
def compiled(parent: nn.Module, names: tuple[str, ...], enabled: bool) -> Iterator[None]:
    """Within the block, each child ``parent.<name>`` runs compiled (shapes dynamic); afterwards the plain
    modules are back in place (they share their parameters with the compiled ones throughout)."""
    if not enabled:
        yield
        return
    originals = {name: getattr(parent, name) for name in names}
    try:
        for name, module in originals.items():
            setattr(parent, name, torch.compile(module, dynamic=True))
        yield
    finally:
        for name, module in originals.items():
            setattr(parent, name, module)
