"""Many agents in one process on one copy of the frozen base weights.

Each agent gets its own module tree (its own LoRA adapter, SparseVLM state and forward hooks), but every frozen
parameter and buffer of the base model is the same tensor object in all of them: ``copy.deepcopy`` with those
tensors pre-seeded in the memo. A device's adapter weights are the only weights it owns, as on a real device
whose base model is the shipped checkpoint.
"""

from __future__ import annotations

import copy
import gc
import os

import torch


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the same parameter and buffer tensors as ``base`` (no weight is copied)."""
    memo: dict[int, object] = {}
    for p in base.parameters():
        memo[id(p)] = p
    for b in base.buffers():
        memo[id(b)] = b
    return copy.deepcopy(base, memo)


def shares_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when every parameter of ``a`` with a name in ``b`` is the same storage."""
    pb = dict(b.named_parameters())
    return all(p.data_ptr() == pb[n].data_ptr() for n, p in a.named_parameters() if n in pb)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; psutil elsewhere)."""
    gc.collect()
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import psutil

        return int(psutil.Process().memory_info().rss)
