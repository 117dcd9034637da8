"""The SparseVLM benchmark's instruments: FLOP counting (CPU SDPA included) and live-tensor peaks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench._sparsevlm_measure import count_flops, peak_tensor_bytes, prefill_breakdown


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


def test_prefill_breakdown_attributes_time_to_the_engine_stages() -> None:
    from device.sparse import SparseConfig, disable_sparsevlm, enable_sparsevlm, engine
    from sim.world import World
    from sim.zoo.architecture import build_llava
    from sim.zoo.recipe import TextSpec, micro_recipe
    from sim.zoo.tokenizer import build_processor, prompt_for

    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    tok = processor.tokenizer
    text = TextSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
    model = build_llava(recipe.vision, text, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, 0)
    sample = World(0, recipe.vision.image_size).sample(0)
    enc = processor(images=[sample.image], text=[prompt_for(sample.question)], return_tensors="pt")
    original_prune = engine.SparsePrefill._prune

    def call() -> None:
        with torch.no_grad():
            model(**enc)

    enable_sparsevlm(model, SparseConfig(budget=4))
    sparse = prefill_breakdown(model, call, 3)
    assert engine.SparsePrefill._prune is original_prune  # patches are undone
    stages = ("setup", "scoring", "pruning", "layers")
    assert all(sparse[k] > 0 for k in stages)
    # The stages are timed one by one inside the engine's own timer, which runs inside the call's: measured
    # independently, they fit (the leftovers are positive, not clamped), so nothing is counted twice.
    assert sparse["engine other"] > 0 and sparse["outside"] > 0
    assert sum(sparse[k] for k in stages) < sparse["total"]
    disable_sparsevlm(model)
    dense = prefill_breakdown(model, call, 3)
    assert dense["layers"] > 0 and dense["setup"] == dense["scoring"] == dense["pruning"] == 0
