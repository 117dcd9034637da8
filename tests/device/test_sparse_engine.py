"""SparseVLM on a randomly initialised micro LLaVA (CLIP + Llama with GQA): pruning, cache, batching,
config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from device.sparse import (
    SparseConfig,
    UnsupportedModelError,
    apply_from_config,
    decision_prefix,
    disable_sparsevlm,
    enable_sparsevlm,
    sparse_stats,
)
from device.sparse.adapters import cached_lengths, output_cache
from device.sparse.raters import NO_TEXT_AFTER_IMAGE
from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.recipe import TextSpec, micro_recipe
from sim.zoo.tokenizer import build_processor, prompt_for

RECIPE = micro_recipe()
N_VISUAL = RECIPE.vision.num_patches  # 16
TEXT = TextSpec(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def processor():
    return build_processor(RECIPE.vision.image_size, RECIPE.vision.patch_size)


@pytest.fixture()
def model(processor):
    tok = processor.tokenizer
    m = build_llava(RECIPE.vision, TEXT, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, seed=3)
    m.generation_config.eos_token_id = None  # compare fixed-length greedy outputs
    return m.eval()


def _inputs(processor, indices, prompts=None):
    world = World(0, RECIPE.vision.image_size)
    samples = [world.sample(i) for i in indices]
    texts = prompts or [prompt_for(s.question) for s in samples]
    return processor(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, enc, **kw):
    with torch.no_grad():
        return model(**enc, position_ids=_positions(enc["attention_mask"]), **kw).logits


def test_disabled_is_bit_identical_to_dense(model, processor) -> None:
    enc = _inputs(processor, [0, 1])
    dense = _logits(model, enc)
    enable_sparsevlm(model, SparseConfig(enabled=False, budget=4))
    assert torch.equal(_logits(model, enc), dense)
    enable_sparsevlm(model, SparseConfig(budget=4))
    assert not torch.equal(_logits(model, enc), dense)
    disable_sparsevlm(model)
    assert torch.equal(_logits(model, enc), dense)
    assert model.config.sparsevlm["enabled"] is False


@pytest.mark.parametrize("budget", [12, 6, 1])
@pytest.mark.parametrize("method", ["sparsevlm", "fastv", "random"])
def test_budget_counts_and_kept_indices(model, processor, budget: int, method: str) -> None:
    enable_sparsevlm(model, SparseConfig(method=method, budget=budget))
    enc = _inputs(processor, [0, 1, 2])
    logits = _logits(model, enc)
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()
    stats = sparse_stats(model)
    assert len(stats.samples) == 3
    for s in stats.samples:
        assert s.n_visual == N_VISUAL
        assert s.final_count == budget
        assert s.layer_counts[0] <= N_VISUAL and s.layer_counts == sorted(s.layer_counts, reverse=True)
        assert s.mean_count == pytest.approx(sum(s.layer_counts) / TEXT.num_layers)
        assert s.kept_patches == sorted(set(s.kept_patches))
        assert all(0 <= p < N_VISUAL for p in s.kept_patches)
        assert len(s.kept_patches) <= budget
        assert s.visual_scores is not None and s.visual_scores.shape == (N_VISUAL,)
        if method == "sparsevlm":
            assert s.raters and s.fallback is None


def test_kv_cache_holds_only_each_layers_tokens(model, processor) -> None:
    enable_sparsevlm(model, SparseConfig(budget=5))
    enc = _inputs(processor, [0])
    with torch.no_grad():
        out = model(**enc, use_cache=True)
    counts = sparse_stats(model).samples[0].layer_counts
    n_text = enc["input_ids"].shape[1] - N_VISUAL
    cached = cached_lengths(output_cache(out))
    assert cached == [n_text + c for c in counts]
    assert counts[-1] == 5 and counts[0] < N_VISUAL


def test_rank_mode_follows_rank_rule(model, processor) -> None:
    cfg = SparseConfig(mode="rank", rank_lambda=0.5)
    enable_sparsevlm(model, cfg)
    _logits(model, _inputs(processor, [0, 1]))
    for s in sparse_stats(model).samples:
        assert len(s.steps) == 2
        for step in s.steps:
            assert step.rank is not None and 1 <= step.rank <= len(s.raters)
            assert step.after == max(1, step.before - round(0.5 * (step.before - step.rank)))
        assert s.final_count == s.steps[-1].after


def test_generate_with_cache_equals_no_cache_greedy(model, processor) -> None:
    enable_sparsevlm(model, SparseConfig(budget=5))
    enc = _inputs(processor, [0, 1])
    n_new = 4
    with torch.no_grad():
        gen = model.generate(
            **enc, max_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        prompt_len = ids.shape[1]
        for step in range(n_new):
            with decision_prefix(model, prompt_len):
                logits = model(
                    input_ids=ids,
                    pixel_values=enc["pixel_values"],
                    attention_mask=mask,
                    position_ids=_positions(mask),
                    use_cache=False,
                ).logits[:, -1]
            assert torch.allclose(logits, gen.logits[step], atol=1e-5)
            nxt = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    assert torch.equal(gen.sequences, ids)


@pytest.mark.parametrize("mode", ["budget", "rank"])
def test_padded_batch_equals_single_runs(model, processor, mode: str) -> None:
    enable_sparsevlm(model, SparseConfig(mode=mode, budget=6))
    enc = _inputs(processor, [0, 1])
    lengths = enc["attention_mask"].sum(1)
    assert lengths[0] != lengths[1]  # left padding is exercised
    batch = _logits(model, enc)
    batch_stats = sparse_stats(model).samples
    for i in range(2):
        single_enc = _inputs(processor, [i])
        single = _logits(model, single_enc)
        n = single.shape[1]
        assert torch.allclose(batch[i, -n:], single[0], atol=1e-5)
        s = sparse_stats(model).samples[0]
        assert s.layer_counts == batch_stats[i].layer_counts
        assert s.kept_patches == batch_stats[i].kept_patches
        assert torch.allclose(s.visual_scores, batch_stats[i].visual_scores, atol=1e-6)
    with torch.no_grad():
        gen_batch = model.generate(**enc, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            assert torch.equal(
                gen_batch[i],
                model.generate(**_inputs(processor, [i]), max_new_tokens=3, do_sample=False)[0, -3:],
            )


def test_budget_above_available_keeps_all(model, processor) -> None:
    enc = _inputs(processor, [0])
    dense = _logits(model, enc)
    enable_sparsevlm(model, SparseConfig(budget=10 * N_VISUAL))
    kept = _logits(model, enc)
    s = sparse_stats(model).samples[0]
    assert s.layer_counts == [N_VISUAL] * TEXT.num_layers and s.kept_patches == list(range(N_VISUAL))
    assert torch.allclose(kept, dense, atol=1e-5)


def test_no_text_after_image_keeps_all(model, processor) -> None:
    enable_sparsevlm(model, SparseConfig(budget=4))
    enc = _inputs(processor, [0, 1], prompts=["USER: <image>", prompt_for("what color is the circle ?")])
    logits = _logits(model, enc)
    assert torch.isfinite(logits).all()
    first, second = sparse_stats(model).samples
    assert first.fallback == NO_TEXT_AFTER_IMAGE and first.final_count == N_VISUAL and first.raters == []
    assert second.fallback is None and second.final_count == 4
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 2


def test_text_only_input_runs_dense(model, processor) -> None:
    enable_sparsevlm(model, SparseConfig(budget=4))
    enc = processor.tokenizer(["USER: what color ? ASSISTANT:"], return_tensors="pt")
    dense_model = model
    with torch.no_grad():
        sparse = dense_model(**enc).logits
        disable_sparsevlm(model)
        assert torch.equal(dense_model(**enc).logits, sparse)


def test_unsupported_model_class_is_named() -> None:
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        enable_sparsevlm(lm, SparseConfig())


def test_config_survives_save_pretrained(model, processor, tmp_path) -> None:
    cfg = SparseConfig(budget=7, layers=[0, 2], recycle=False)
    enable_sparsevlm(model, cfg)
    enc = _inputs(processor, [0])
    expected = _logits(model, enc)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert SparseConfig.model_validate(loaded.config.sparsevlm) == cfg
    assert apply_from_config(loaded)
    assert torch.allclose(_logits(loaded, enc), expected, atol=1e-6)
    s = sparse_stats(loaded).samples[0]
    assert s.final_count == 7 and [st.layer for st in s.steps] == [0, 2] and all(st.merged == 0 for st in s.steps)


def _llava_with(text_config, processor):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from sim.zoo.architecture import vision_config

    tok = processor.tokenizer
    cfg = LlavaConfig(
        vision_config=vision_config(RECIPE.vision),
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=N_VISUAL,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(5)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_family_decoders(processor, family: str) -> None:
    from transformers import MistralConfig, Qwen2Config

    sizes = dict(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    text = Qwen2Config(**sizes) if family == "qwen2" else MistralConfig(sliding_window=None, **sizes)
    model = _llava_with(text, processor)
    enable_sparsevlm(model, SparseConfig(budget=5))
    enc = _inputs(processor, [0, 1])
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        for _ in range(3):
            with decision_prefix(model, enc["input_ids"].shape[1]):
                logits = model(
                    input_ids=ids,
                    pixel_values=enc["pixel_values"],
                    attention_mask=mask,
                    position_ids=_positions(mask),
                    use_cache=False,
                ).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(gen, ids)
    assert [s.final_count for s in sparse_stats(model).samples] == [5, 5]


def test_sliding_window_decoder_is_refused(processor) -> None:
    from transformers import MistralConfig

    text = MistralConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        enable_sparsevlm(_llava_with(text, processor), SparseConfig())


def test_rater_scores_equal_the_layers_own_attention_rows(model, processor) -> None:
    """Scoring = the layer's own post-softmax attention (RoPE applied) restricted to rater rows, head mean."""
    from device.sparse.adapters import adapter_for
    from device.sparse.scoring import rater_attention_batch

    enc = _inputs(processor, [0])
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(**enc, output_attentions=True, output_hidden_states=True)
        adapter = adapter_for(model)
        hidden = out.hidden_states[1]  # input of LM layer 1
        pos = torch.arange(hidden.shape[1])[None]
        cos, sin = adapter.rotary(hidden, pos)
        rows = torch.tensor([hidden.shape[1] - 3, hidden.shape[1] - 1])
        normed = adapter.input_norm(1, hidden)
        ours = rater_attention_batch(adapter, 1, normed, cos, sin, rows[None], None)[0]
    expected = out.attentions[1][0][:, rows].mean(dim=0)
    assert torch.allclose(ours, expected, atol=1e-5)
