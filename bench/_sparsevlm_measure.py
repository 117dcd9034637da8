"""Measurement helpers for the SparseVLM benchmark: FLOPs, live-tensor peak memory, CPU time."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """CPU's fused SDPA kernel is missing from torch's FLOP registry; count it like the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul / linear / attention FLOPs of one call (torch.utils.flop_counter, CPU SDPA registered)."""
    mode = FlopCounterMode(
        display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    )
    with mode:
        fn()
    return int(mode.get_total_flops())


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages created by ops inside the mode and still alive (activations, masks, KV
    cache, outputs). Weights and inputs made before entering are not counted, nor kernel-internal scratch."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _purge(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak live-tensor bytes while ``fn`` runs (its result is dropped before returning)."""
    mode = LiveTensorPeak()
    with mode:
        result = fn()
        del result
    return mode.peak


def time_call(fn: Callable[[], Any]) -> float:
    """CPU time (process CPU seconds, all threads) of one call of ``fn``.

    Process CPU time rather than wall time: on a shared machine wall time mostly measures other people's load.
    """
    start = time.process_time()
    fn()
    return time.process_time() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def _timed(owner: Any, name: str, totals: dict[str, float], label: str) -> Iterator[None]:
    """Patch ``owner.name`` to add its CPU seconds to ``totals[label]``; restore it on exit."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.process_time() - start

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def prefill_breakdown(model: Any, call: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Mean CPU seconds per call of ``call`` (a prefill of ``model``) by stage: the sparse engine's ``setup``
    (slots, raters), ``scoring``, ``pruning`` (ranking, recycling, gathers) and ``engine other`` (masks,
    bookkeeping, final norm); ``layers`` (the model's own decoder layers, dense or sparse); ``outside``
    (everything else: embedding, projector merge, dense masks and RoPE, LM head)."""
    from device.sparse import engine
    from device.sparse.adapters import adapter_for

    totals: dict[str, float] = defaultdict(float)
    with ExitStack() as stack:
        for owner, name, label in (
            (engine.SparsePrefill, "_initial", "setup"),
            (engine, "_score_batch", "scoring"),
            (engine.SparsePrefill, "_prune", "pruning"),
            (type(adapter_for(model).layers[0]), "forward", "layers"),
            (engine.SparsePrefill, "run", "engine"),
        ):
            stack.enter_context(_timed(owner, name, totals, label))
        call()  # warm-up
        totals.clear()
        start = time.process_time()
        for _ in range(repeats):
            call()
        total = time.process_time() - start
    out = {k: totals[k] / repeats for k in ("setup", "scoring", "pruning", "layers")}
    engine_time = totals["engine"] / repeats
    out["engine other"] = max(0.0, engine_time - sum(out.values())) if engine_time else 0.0
    out["outside"] = total / repeats - (engine_time or out["layers"])
    out["total"] = total / repeats
    return out
