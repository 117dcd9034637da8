"""The SparseVLM benchmark's instruments: FLOP counting (CPU SDPA included) and live-tensor peaks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench._sparsevlm_measure import count_flops, peak_tensor_bytes


def test_flops_of_matmul_and_cpu_sdpa() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = torch.randn(1, 2, 10, 8)
    # fused CPU kernel (no mask): QK^T and PV, 2 * (2 * b * h * s * s * d)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)) == 4 * 2 * 10 * 10 * 8


def test_peak_counts_live_tensors_only() -> None:
    weights = torch.randn(1000)  # made before: not counted

    def two_alive() -> torch.Tensor:
        x = torch.zeros(1000)  # 4000 B
        y = x + weights  # 4000 B, x and y alive together
        return y.sum()

    def one_at_a_time() -> None:
        for _ in range(3):
            z = torch.zeros(1000)
            del z

    assert 8000 <= peak_tensor_bytes(two_alive) < 8100
    assert 4000 <= peak_tensor_bytes(one_at_a_time) < 4100
