"""The micro zoo: builds in seconds, saves and reloads exactly, trains, evaluates, matches the processor."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from common.errors import ModelLoadError
from common.modeling import load_mllm, modules_to_keep, nf4_quantizable
from sim.world import World
from sim.zoo.architecture import build_llava
from sim.zoo.batching import BatchEncoder
from sim.zoo.build import ensure_zoo, is_built
from sim.zoo.compiling import compiler_available
from sim.zoo.evaluate import evaluate, predict_answers
from sim.zoo.recipe import StageSpec, TextSpec, ZooRecipe, micro_recipe
from sim.zoo.tokenizer import build_processor, prompt_for
from sim.zoo.train import answer_loss, train_answers


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    return ensure_zoo(micro_recipe(), home=tmp_path_factory.mktemp("zoo"), progress=False)


def test_micro_zoo_builds_with_manifest(micro_zoo):
    manifest = micro_zoo.manifest()
    assert manifest["digest"] == micro_recipe().digest()
    p = manifest["parameters"]
    assert p["device_language_model"] * 3 < p["teacher_language_model"]
    assert is_built(micro_zoo, micro_recipe())


def test_cache_is_reused_and_recipe_change_rebuilds(micro_zoo):
    home = micro_zoo.root.parent
    stamp = (micro_zoo.teacher / "config.json").stat().st_mtime_ns
    again = ensure_zoo(micro_recipe(), home=home, progress=False)
    assert (again.teacher / "config.json").stat().st_mtime_ns == stamp
    changed = micro_recipe().model_copy(update={"seed": 5})
    assert changed.digest() != micro_recipe().digest()
    assert not is_built(type(micro_zoo).at(home / f"micro-{changed.digest()}"), changed)


def test_teacher_finishing_stage_trains_the_teacher_only(micro_zoo, tmp_path):
    from safetensors.torch import load_file

    def weights(directory):
        return load_file(next(directory.glob("*.safetensors")))

    unfinished = ensure_zoo(micro_recipe().model_copy(update={"teacher_finish": None}), home=tmp_path, progress=False)
    device, other_device = weights(micro_zoo.device), weights(unfinished.device)
    assert all(torch.equal(device[k], other_device[k]) for k in device)
    teacher, other_teacher = weights(micro_zoo.teacher), weights(unfinished.teacher)
    tower = [k for k in teacher if "vision_tower" in k]
    assert tower and all(torch.equal(teacher[k], other_teacher[k]) for k in tower)
    assert any(not torch.equal(teacher[k], other_teacher[k]) for k in teacher if "language_model" in k)
    assert micro_zoo.manifest()["recipe"]["teacher_finish"]["steps"] == 2


def test_members_share_the_vision_tower_and_have_llava_geometry(micro_zoo):
    teacher = AutoModelForImageTextToText.from_pretrained(micro_zoo.teacher)
    device = AutoModelForImageTextToText.from_pretrained(micro_zoo.device)
    assert isinstance(teacher, LlavaForConditionalGeneration)
    assert teacher.config.vision_feature_layer == -2
    assert teacher.config.vision_feature_select_strategy == "default"
    for (name, a), (_, b) in zip(
        teacher.model.vision_tower.state_dict().items(), device.model.vision_tower.state_dict().items()
    ):
        assert torch.equal(a, b), name


def test_save_from_pretrained_identical_logits(micro_zoo, tmp_path):
    loaded = load_mllm(micro_zoo.device)
    s = World(0, 32).samples(0, 3, "night")
    batch = loaded.processor(
        images=[Image.fromarray(x.image) for x in s], text=[prompt_for(x.question) for x in s],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    with torch.no_grad():
        before = loaded.model(**batch).logits
    loaded.model.save_pretrained(tmp_path / "copy")
    loaded.processor.save_pretrained(tmp_path / "copy")
    again = load_mllm(tmp_path / "copy")
    with torch.no_grad():
        after = again.model(**again.processor(
            images=[Image.fromarray(x.image) for x in s], text=[prompt_for(x.question) for x in s],
            return_tensors="pt", padding=True,
        )).logits  # fmt: skip
    assert torch.equal(before, after)


def test_fast_encoder_equals_saved_processor(micro_zoo):
    processor = AutoProcessor.from_pretrained(micro_zoo.device)
    encoder = BatchEncoder.from_processor(processor)
    s = World(1, 32).samples(0, 5, "fog")
    fast = encoder.encode([x.image for x in s], [x.question for x in s])
    slow = processor(
        images=[Image.fromarray(x.image) for x in s], text=[prompt_for(x.question) for x in s],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    assert torch.equal(fast["input_ids"], slow["input_ids"])
    assert torch.equal(fast["attention_mask"], slow["attention_mask"])
    assert torch.allclose(fast["pixel_values"], slow["pixel_values"], atol=1e-6)


def test_chat_template_gives_the_training_prompt(micro_zoo):
    processor = AutoProcessor.from_pretrained(micro_zoo.device)
    content = [{"type": "image"}, {"type": "text", "text": "how many objects are there ?"}]
    messages = [{"role": "user", "content": content}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt_for(
        "how many objects are there ?"
    )


def test_generate_first_token_equals_fast_prediction(micro_zoo):
    loaded = load_mllm(micro_zoo.teacher)
    encoder = BatchEncoder.from_processor(loaded.processor)
    s = World(2, 32).samples(0, 4)
    preds = predict_answers(loaded.model, encoder, [x.image for x in s], [x.question for x in s])
    batch = loaded.processor(
        images=[Image.fromarray(x.image) for x in s], text=[prompt_for(x.question) for x in s],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    out = loaded.model.generate(**batch, max_new_tokens=2, do_sample=False)
    first = loaded.processor.tokenizer.convert_ids_to_tokens(out[:, batch["input_ids"].shape[1]].tolist())
    assert first == preds


@pytest.mark.parametrize(
    "compile_model",
    [
        False,
        pytest.param(  # opt-in: compiling takes about a minute; the swap and restore are tested in test_compiling
            True,
            marks=[pytest.mark.slow, pytest.mark.skipif(not compiler_available(), reason="needs a C++ compiler")],
        ),
    ],
)
def test_training_step_lowers_loss(compile_model):
    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(recipe.vision, recipe.device, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    world = World(0, 32)
    fixed = world.samples(0, 16)
    batch = encoder.encode([s.image for s in fixed], [s.question for s in fixed], [s.answer for s in fixed])
    answers = encoder.answer_ids([s.answer for s in fixed])
    with torch.no_grad():
        before = float(answer_loss(model, batch, answers, encoder.eos_id))
    train_answers(model, world, encoder, StageSpec(steps=25, batch_size=16, lr=3e-3, warmup=2),
                  shifted=False, min_severity=0.0, seed=0, compile_model=compile_model)  # fmt: skip
    with torch.no_grad():
        after = float(answer_loss(model, batch, answers, encoder.eos_id))
    assert after < before - 0.5
    # Compiled training leaves the plain transformers modules in place.
    assert not any("_orig_mod" in name for name in model.state_dict())


def test_evaluate_reports_every_domain_and_type(micro_zoo):
    loaded = load_mllm(micro_zoo.device)
    encoder = BatchEncoder.from_processor(loaded.processor)
    res = evaluate(loaded.model, encoder, ["clear", "night"], samples_per_domain=20, seed=0, image_size=32)
    assert set(res) == {"clear", "night"}
    assert all(r.total == 20 and 0.0 <= r.value <= 1.0 for r in res.values())
    assert sum(t for _, t in res["clear"].by_type.values()) == 20


def test_missing_and_corrupt_model_directories(tmp_path, micro_zoo):
    with pytest.raises(ModelLoadError, match="not found"):
        load_mllm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_mllm(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_mllm(broken)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in micro_zoo.device.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_mllm(truncated)


def test_recipe_digest_is_stable_and_sensitive():
    # Stable across processes (Python salts string hashes per process): a recipe names the same cache everywhere.
    code = "from sim.zoo.recipe import ZooRecipe; print(ZooRecipe().digest())"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
        ).stdout.strip()
        for seed in (1, 2)
    }  # fmt: skip
    assert seen == {ZooRecipe().digest()}
    assert ZooRecipe().digest() != ZooRecipe(seed=1).digest()
    assert json.loads(ZooRecipe().model_dump_json())["vision"]["patch_size"] == 8
    # Options added later count only when set, so existing caches stay valid.
    from sim.zoo.recipe import LATER_OPTIONS, RECIPE_CODE_VERSION

    blob = json.dumps({"recipe": ZooRecipe().model_dump(exclude=set(LATER_OPTIONS)), "code": RECIPE_CODE_VERSION},
                      sort_keys=True)  # fmt: skip
    assert ZooRecipe().digest() == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert ZooRecipe(vision_confusion_weight=0.3).digest() != ZooRecipe().digest()
    assert ZooRecipe(vision_private_heads={"cast": 1.0}).digest() != ZooRecipe().digest()
    assert ZooRecipe(vision_shift_weights={"night": 2.0}).digest() != ZooRecipe().digest()


@pytest.fixture(scope="module")
def quantizable_llava(tmp_path_factory):
    """A micro-vision LLaVA whose language model is 64 wide (shapes bitsandbytes 4-bit supports), saved."""
    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    tok = processor.tokenizer
    text = TextSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128)
    model = build_llava(recipe.vision, text, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, 0)
    path = tmp_path_factory.mktemp("quantizable")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _linear_kinds(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__.startswith("Linear")}


def test_quantized_load_4bit(quantizable_llava):
    pytest.importorskip("bitsandbytes")
    loaded = load_mllm(quantizable_llava, quantization="4bit")
    kinds = _linear_kinds(loaded.model)
    lm = {n: k for n, k in kinds.items() if ".language_model." in n}
    assert lm and set(lm.values()) == {"Linear4bit"}
    kept = {n: k for n, k in kinds.items() if ".language_model." not in n}
    assert any("vision_tower" in n for n in kept) and set(kept.values()) == {"Linear"}
    encoder = BatchEncoder.from_processor(loaded.processor)
    s = World(0, 32).samples(0, 2)
    batch = encoder.encode([x.image for x in s], [x.question for x in s])
    full = load_mllm(quantizable_llava).model
    with torch.no_grad():
        q_logits, f_logits = loaded.model(**batch).logits, full(**batch).logits
    assert torch.isfinite(q_logits).all()
    cos = torch.nn.functional.cosine_similarity(q_logits.flatten(), f_logits.flatten(), dim=0)
    assert cos > 0.9, f"4-bit logits too far from full precision (cosine {cos:.3f})"
    preds = predict_answers(loaded.model, encoder, [x.image for x in s], [x.question for x in s])
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)


def test_quantized_load_8bit_keeps_vision_in_full_precision(quantizable_llava):
    pytest.importorskip("bitsandbytes")
    kinds = _linear_kinds(load_mllm(quantizable_llava, quantization="8bit").model)
    assert {k for n, k in kinds.items() if ".language_model." in n} == {"Linear8bitLt"}
    assert {k for n, k in kinds.items() if ".language_model." not in n} == {"Linear"}


def test_4bit_of_a_model_with_no_quantizable_layer_is_refused(micro_zoo):
    # the micro teacher is 48 wide: no layer has in_features % 64 == 0, so nothing could be quantized
    with pytest.raises(ModelLoadError, match="no linear layer .* can be quantized to 4bit"):
        load_mllm(micro_zoo.teacher, quantization="4bit")


def test_modules_kept_in_full_precision_by_path_and_shape():
    linears = {
        "model.vision_tower.encoder.layers.0.mlp.fc1": (32, 64),
        "model.multi_modal_projector.linear_1": (1024, 4096),
        "model.language_model.layers.0.self_attn.q_proj": (4096, 4096),
        "model.language_model.layers.0.mlp.down_proj": (11008, 4096),
        "model.language_model.layers.0.mlp.odd": (48, 48),
        "lm_head": (4096, 32000),
    }
    assert modules_to_keep(linears, "4bit") == [
        "lm_head",
        "model.language_model.layers.0.mlp.odd",
        "model.multi_modal_projector",
        "model.vision_tower",
    ]
    assert modules_to_keep(linears, "8bit") == ["lm_head", "model.multi_modal_projector", "model.vision_tower"]
    assert nf4_quantizable(4096, 4096) and nf4_quantizable(11008, 4096) and not nf4_quantizable(48, 64)


def test_question_sets_equal_single_question_prompts():
    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(recipe.vision, recipe.teacher, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    model.eval()
    world = World(0, 32)
    samples = world.samples(0, 3)
    sets = [[(s.question, s.answer)] + [(q, a) for _, q, a in world.extra_questions(s, 3)] for s in samples]
    assert all(len({q for q, _ in qs}) == len(qs) for qs in sets)
    batch, labels = encoder.encode_question_sets([s.image for s in samples], sets)
    with torch.no_grad():
        logits = model(**batch).logits
    for i, qs in enumerate(sets):
        answer_positions = [j for j in range(labels.shape[1]) if labels[i, j] not in (-100, encoder.eos_id)]
        assert len(answer_positions) == len(qs)
        for (question, answer), j in zip(qs, answer_positions):
            assert labels[i, j] == encoder.word_ids(answer)[0]
            single = encoder.encode([samples[i].image], [question])
            with torch.no_grad():
                ref = model(**single).logits[0, -1]
            assert torch.allclose(ref, logits[i, j], atol=1e-5)


def test_recipes_geometry():
    from sim.zoo.recipe import RECIPES

    assert RECIPES["base"]().vision.num_patches == 144
    assert RECIPES["base576"]().vision.num_patches == 576
    assert not RECIPES["base576"]().with_teacher


def test_training_domain_streams_respect_limits_weights_and_curriculum():
    import collections
    import itertools

    import numpy as np

    from common.errors import ConfigError
    from sim.world.shifts import Domain, ShiftSpec
    from sim.zoo.train import _ramped, domain_stream

    limits = {"night": 0.35, "fog": 1.0}
    stream = domain_stream(np.random.default_rng(0), True, 0.0, clear_share=0.0, max_severity=limits)
    for dom in itertools.islice(stream, 300):
        assert dom.shifts and all(s.name in limits and s.severity <= limits[s.name] for s in dom.shifts)
    weighted = domain_stream(np.random.default_rng(1), True, 0.4, clear_share=0.0, weights={"night": 5})
    firsts = collections.Counter(d.shifts[0].name for d in itertools.islice(weighted, 2000))
    assert firsts["night"] > 2.5 * firsts["dusk"]
    rng = np.random.default_rng(2)
    night = Domain((ShiftSpec("night", 1.0),))
    early = [_ramped(night, 0.1, rng) for _ in range(400)]
    assert sum(not d.shifts for d in early) > 300 and all(s.severity <= 0.55 for d in early for s in d.shifts)
    assert _ramped(night, 1.0, rng) == night
    with pytest.raises((ConfigError, ValueError)):
        ZooRecipe(vision_max_severity={"sepia": 0.5})


def test_pretraining_returns_private_heads_and_uniform_loss_measures_confusion():
    from sim.zoo.patch_targets import DensePatchHeads
    from sim.zoo.train import pretrain_vision

    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(recipe.vision, recipe.device, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    tower = model.model.vision_tower
    spec = StageSpec(steps=3, batch_size=8, lr=3e-3, warmup=1)
    losses, shared, private = pretrain_vision(
        tower, World(0, 32), encoder, spec, max_severity={"fog": 1.0}, private_heads={"cast": 1.0, "night": 0.0},
        confusion_weight=0.5,
    )  # fmt: skip
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert sorted(private) == ["cast"]  # a severity of 0 means the shift is not used
    _, _, none = pretrain_vision(tower, World(0, 32), encoder, spec, max_severity={"fog": 1.0})
    assert none == {}

    feats = torch.randn(2, 5, recipe.vision.hidden_size)
    flat = DensePatchHeads(recipe.vision.hidden_size)
    for head in flat.all():
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    sharp = DensePatchHeads(recipe.vision.hidden_size)
    torch.nn.init.normal_(sharp.heads["color"].weight, std=5.0)
    with torch.no_grad():
        assert abs(float(flat.uniform_loss(feats, ("color",)))) < 1e-6
        assert float(sharp.uniform_loss(feats, ("color",))) > 1.0


def test_projector_starts_from_every_head_set_it_is_given():
    from sim.zoo.patch_targets import DensePatchHeads
    from sim.zoo.train import init_projector_from_heads

    recipe = micro_recipe()
    processor = build_processor(recipe.vision.image_size, recipe.vision.patch_size)
    encoder = BatchEncoder.from_processor(processor)
    model = build_llava(recipe.vision, recipe.teacher, len(processor.tokenizer), encoder.image_id, encoder.pad_id, 0)
    sets = [DensePatchHeads(recipe.vision.hidden_size) for _ in range(2)]
    init_projector_from_heads(model, sets)
    proj = model.model.multi_modal_projector
    rows = torch.cat([h.weight for hs in sets for h in hs.all()])
    assert torch.equal(proj.linear_1.weight[: rows.shape[0]], rows)
    feats = torch.randn(3, recipe.vision.hidden_size)
    logits = torch.cat([h(feats) for hs in sets for h in hs.all()], dim=-1)
    with torch.no_grad():
        out = proj(feats)[:, : rows.shape[0]]
    assert torch.allclose(out, proj.act(logits), atol=1e-5)
    with pytest.raises(ValueError, match="unknown shift"):
        ZooRecipe(vision_private_heads={"sepia": 1.0})


def test_colour_rolls_rename_colours_only_under_their_shift():
    from sim.world import COLORS
    from sim.world.shifts import Domain, ShiftSpec
    from sim.zoo.train import ROLL_FROM, _rolled_colours

    n = len(COLORS)
    colour = torch.tensor([[0, 1, n], [0, 2, 3], [4, 0, 1], [1, 2, 0]])
    domains = [
        Domain((ShiftSpec("night", 1.0),)),
        Domain(),
        Domain((ShiftSpec("night", ROLL_FROM / 2),)),  # too mild: keeps its names
        Domain((ShiftSpec("fog", 1.0), ShiftSpec("cast", 0.8), ShiftSpec("night", 1.0))),
    ]
    out = _rolled_colours(colour, domains, {"night": 2, "cast": 1})
    assert out[0].tolist() == [0, 3, 2]  # background stays 0; n + 2 wraps to 2
    assert torch.equal(out[1], colour[1]) and torch.equal(out[2], colour[2])
    assert out[3].tolist() == [2, 3, 0]  # the first rolled shift present (cast) decides
    assert torch.equal(colour[0], torch.tensor([0, 1, n]))  # input untouched
    assert ZooRecipe(vision_colour_rolls={"night": 2}).digest() != ZooRecipe().digest()
    with pytest.raises(ValueError, match="must be > 0"):
        ZooRecipe(vision_shift_weights={"night": 0.0})
    with pytest.raises(ValueError, match="unknown shift"):
        ZooRecipe(teacher_shift_weights={"nite": 1.0})
    with pytest.raises(ValueError, match="colour roll"):
        ZooRecipe(vision_colour_rolls={"night": n})
    with pytest.raises(ValueError, match="unknown shift"):
        ZooRecipe(vision_colour_rolls={"sepia": 1})
    with pytest.raises(ValueError, match="weight of 'cast' must be > 0"):
        ZooRecipe(teacher_finish={"shift_weights": {"cast": -1.0}})
    with pytest.raises(ValueError, match="unknown shift"):
        ZooRecipe(teacher_finish={"shift_weights": {"dawn": 1.0}})
    with pytest.raises(ValueError, match="min_severity"):
        ZooRecipe(teacher_finish={"min_severity": 1.5})


def test_sampling_error_note_names_the_widest_cell():
    from sim.zoo.evaluate import Accuracy
    from sim.zoo.report import sampling_error_note

    results = {"teacher": {"clear": Accuracy(90, 100)}, "device": {"clear": Accuracy(50, 100)}}
    assert sampling_error_note(results, ["clear"]).endswith("at most 5.0 points (100 samples)")
    results["device"]["clear"] = Accuracy(99, 100)
    assert "at most 3.0 points" in sampling_error_note(results, ["clear"])
