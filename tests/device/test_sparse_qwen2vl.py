"""SparseVLM on a randomly initialised micro Qwen2-VL (M-RoPE positions): cache, batching, counts."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from device.sparse import SparseConfig, decision_prefix, disable_sparsevlm, enable_sparsevlm, sparse_stats

IMAGE, START, END, PAD = 60, 58, 59, 0
GRID = 8  # 8x8 patches -> 16 visual tokens after the 2x2 merge
N_VISUAL = GRID * GRID // 4


@pytest.fixture(scope="module")
def model() -> Qwen2VLForConditionalGeneration:
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=32,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        mlp_ratio=2,
    )
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=61,
        vision_start_token_id=START,
        vision_end_token_id=END,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    m = Qwen2VLForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = PAD
    return m


def _inputs(prompts: list[tuple[list[int], list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded batch of [before] <start> <image>*N <end> [after] with random pixels."""
    rows = [before + [START] + [IMAGE] * N_VISUAL + [END] + after for before, after in prompts]
    n = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(rows) * GRID * GRID, 3 * 2 * 4 * 4, generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, GRID, GRID]] * len(rows)),
        "mm_token_type_ids": (ids == IMAGE).int(),
    }


PROMPTS = [([5, 6], [7, 8, 9, 10, 11]), ([5], [12, 13, 14])]


def test_generate_with_cache_equals_no_cache_greedy(model) -> None:
    enable_sparsevlm(model, SparseConfig(budget=5))
    enc = _inputs(PROMPTS)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
        assert [s.final_count for s in sparse_stats(model).samples] == [5, 5]
        ids, mask, mm = enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"]
        for _ in range(4):
            with decision_prefix(model, enc["input_ids"].shape[1]):
                logits = model(
                    input_ids=ids,
                    attention_mask=mask,
                    mm_token_type_ids=mm,
                    use_cache=False,
                    pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"],
                ).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            mm = torch.cat([mm, torch.zeros_like(nxt, dtype=mm.dtype)], 1)
    assert torch.equal(gen, ids)
    disable_sparsevlm(model)


def test_padded_batch_equals_single_runs_and_disabled_is_dense(model) -> None:
    enc = _inputs(PROMPTS)
    with torch.no_grad():
        dense = model(**enc).logits
        enable_sparsevlm(model, SparseConfig(mode="rank"))
        batch = model(**enc).logits
        counts = [s.layer_counts for s in sparse_stats(model).samples]
        for i, prompt in enumerate(PROMPTS):
            single = _inputs([prompt])
            single["pixel_values"] = enc["pixel_values"][i * GRID * GRID : (i + 1) * GRID * GRID]
            logits = model(**single).logits
            assert torch.allclose(batch[i, -logits.shape[1] :], logits[0], atol=1e-5)
            assert sparse_stats(model).samples[0].layer_counts == counts[i]
        assert all(c[-1] < N_VISUAL for c in counts)
        enable_sparsevlm(model, SparseConfig(enabled=False))
        assert torch.equal(model(**enc).logits, dense)
    disable_sparsevlm(model)


def test_keep_all_budget_reproduces_dense_with_mrope(model) -> None:
    """Nothing pruned: the sparse path (its own masks, M-RoPE cos/sin per slot) must match the dense model."""
    enc = _inputs(PROMPTS)
    with torch.no_grad():
        dense = model(**enc).logits
        enable_sparsevlm(model, SparseConfig(budget=10 * N_VISUAL))
        kept = model(**enc).logits
        assert [s.final_count for s in sparse_stats(model).samples] == [N_VISUAL, N_VISUAL]
    valid = enc["attention_mask"].bool()
    assert torch.allclose(kept[valid], dense[valid], atol=1e-5)
    disable_sparsevlm(model)
