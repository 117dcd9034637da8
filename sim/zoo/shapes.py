"""Shape members of the zoo: real checkpoints' geometry with random weights, built in seconds, never trained.

``llava-1.5-7b-shape`` is LLaVA-1.5-7B as ``llava-hf/llava-1.5-7b-hf`` configures it (CLIP ViT-L/14 at 336 px: 576
visual tokens of width 1024 from layer -2; Llama-2-7B: hidden 4096, 32 heads, MLP 11008, vocabulary 32064) with a
13B-shaped teacher (hidden 5120, 40 heads, MLP 13824) on the same tower; ``qwen2-vl-2b-shape`` is Qwen2-VL-2B
(hidden 1536, 12 heads over 2 KV heads, MLP 8960, vocabulary 151936; a 1280-wide ViT with 14 px patches, 2x2
merging and dynamic resolution: a 336x336 frame gives 144 tokens, a 448x336 one 192). Only the depth is cut (2 LM
and 2 tower layers by default) so the whole loop fits this machine. Weights come from a fixed seed; the tokenizer
is word-level over the world's words, padded with filler tokens to the real vocabulary size, so ids, embedding
and head sizes are the real ones. Nothing here is shipped: builds go to the zoo cache (``zoo_home``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError

from common.config import StrictConfig
from common.errors import ConfigError
from common.modeling import ImageTextProcessor

SHAPE_CODE_VERSION = 2  # 2: generation_config.max_new_tokens = the family default
FAMILY_DEFAULT_MAX_NEW_TOKENS = {"llava": 16, "qwen2_vl": 16}


class VisionShape(StrictConfig):
    """The vision tower's geometry (CLIP ViT for LLaVA, Qwen2-VL's ViT)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    real_layers: int
    patch_size: int = 14
    image_size: int = 336  # LLaVA: the square input; Qwen2-VL: the frame the benchmarks feed (dynamic otherwise)
    out_hidden_size: int | None = None  # Qwen2-VL: the merger's output width (the LM's)
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2


class TextShape(StrictConfig):
    """The language model's geometry."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    real_layers: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False


class ModelShape(StrictConfig):
    """One model of a shape member: its family and geometry."""

    family: Literal["llava", "qwen2_vl"]
    label: str
    vision: VisionShape
    text: TextShape


class ShapeRecipe(StrictConfig):
    """A shape member: the device model, an optional teacher on the same tower, the cut depth and the seed."""

    name: str
    device: ModelShape
    teacher: ModelShape | None = None
    lm_layers: int = Field(2, ge=1)
    tower_layers: int = Field(2, ge=1)
    seed: int = 0
    device_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    teacher_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"

    def digest(self) -> str:
        blob = json.dumps({"recipe": self.model_dump(), "code": SHAPE_CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def with_teacher(self) -> bool:
        return self.teacher is not None


CLIP_L_336 = VisionShape(hidden_size=1024, intermediate_size=4096, num_heads=16, real_layers=24)
LLAVA_7B = ModelShape(
    family="llava",
    label="LLaVA-1.5-7B",
    vision=CLIP_L_336,
    text=TextShape(
        hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, real_layers=32, vocab_size=32064
    ),
)
LLAVA_13B = ModelShape(
    family="llava",
    label="LLaVA-1.5-13B",
    vision=CLIP_L_336,
    text=TextShape(
        hidden_size=5120, intermediate_size=13824, num_heads=40, num_kv_heads=40, real_layers=40, vocab_size=32064
    ),
)
QWEN2_VL_2B = ModelShape(
    family="qwen2_vl",
    label="Qwen2-VL-2B",
    vision=VisionShape(
        hidden_size=1280, intermediate_size=5120, num_heads=16, real_layers=32, out_hidden_size=1536, image_size=336
    ),
    text=TextShape(
        hidden_size=1536,
        intermediate_size=8960,
        num_heads=12,
        num_kv_heads=2,
        real_layers=28,
        vocab_size=151936,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
)

SHAPES = {
    "llava-1.5-7b-shape": lambda: ShapeRecipe(name="llava-1.5-7b-shape", device=LLAVA_7B, teacher=LLAVA_13B),
    "llava-1.5-13b-shape": lambda: ShapeRecipe(name="llava-1.5-13b-shape", device=LLAVA_13B),
    "qwen2-vl-2b-shape": lambda: ShapeRecipe(name="qwen2-vl-2b-shape", device=QWEN2_VL_2B),
}

# LLaVA's prompt ids (llava-hf): <unk> 0, <s> 1, </s> 2; <image> 32000 and <pad> 32001 after the 32000 words.
LLAVA_SPECIALS = ("<unk>", "<s>", "</s>")
LLAVA_WORDS = 32000
# Qwen2's special tokens follow its 151643 regular tokens, in this order (tokenizer_config.json of Qwen2-VL).
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_WORDS = 151643
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _words() -> list[str]:
    from sim.world.questions import ANSWERS, QUESTION_WORDS
    from sim.zoo.tokenizer import TEMPLATE_WORDS

    return list(dict.fromkeys(TEMPLATE_WORDS + QUESTION_WORDS + ANSWERS))


def _word_vocab(specials: tuple[str, ...], size: int, specials_first: bool) -> dict[str, int]:
    """Specials, the world's words, then ``<w{i}>`` fillers up to ``size`` entries (specials first or last)."""
    words = _words()
    head = list(specials) if specials_first else []
    body = head + words
    fillers = [f"<w{i}>" for i in range(size - len(body) - (0 if specials_first else len(specials)))]
    ordered = body + fillers + ([] if specials_first else list(specials))
    return {tok: i for i, tok in enumerate(ordered)}


def llava_processor(image_size: int, patch_size: int):
    """LLaVA-1.5's processor with a word-level tokenizer of LLaVA's 32000 + 2 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sim.zoo.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN

    vocab = _word_vocab(LLAVA_SPECIALS, LLAVA_WORDS, specials_first=True)
    vocab[IMAGE_TOKEN], vocab["<pad>"] = LLAVA_WORDS, LLAVA_WORDS + 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=4096,
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_normalize=True, do_convert_rgb=True,
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def qwen2_vl_processor(patch_size: int, merge_size: int, temporal_patch_size: int) -> ImageTextProcessor:
    """Qwen2-VL's image processor (PIL backend, dynamic resolution) and a word-level tokenizer of its ids.

    ``Qwen2VLProcessor`` itself needs a video processor, which needs torchvision (not installable here): the two
    parts are saved side by side and ``load_mllm`` reads them back as an ``ImageTextProcessor``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = _word_vocab(QWEN_SPECIALS, QWEN_WORDS + len(QWEN_SPECIALS), specials_first=False)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        padding_side="left", model_max_length=32768,
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    images = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
        min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    )  # fmt: skip
    return ImageTextProcessor(image_processor=images, tokenizer=tok)


def llava_config(shape: ModelShape, lm_layers: int, tower_layers: int):
    """``LlavaConfig`` with the shape's geometry at the cut depth (llava-hf's ids and feature choices)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = shape.vision, shape.text
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_attention_heads=v.num_heads,
        num_hidden_layers=tower_layers, image_size=v.image_size, patch_size=v.patch_size, projection_dim=768,
        hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, num_hidden_layers=lm_layers, vocab_size=t.vocab_size,
        max_position_embeddings=4096, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        pad_token_id=LLAVA_WORDS + 1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=LLAVA_WORDS, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(v.image_size // v.patch_size) ** 2, pad_token_id=LLAVA_WORDS + 1,
    )  # fmt: skip


def mrope_sections(text: TextShape) -> list[int]:
    """M-RoPE's (temporal, height, width) split of the rotary half-dimension: Qwen2-VL's [16, 24, 24] at head_dim
    128, in the same 1/4, 3/8, 3/8 proportion at a narrower width (the small test models)."""
    half = text.hidden_size // text.num_heads // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen2_vl_config(shape: ModelShape, lm_layers: int, tower_layers: int):
    """``Qwen2VLConfig`` with the shape's geometry at the cut depth (Qwen2-VL-2B's ids and M-RoPE sections)."""
    from transformers import Qwen2VLConfig

    v, t = shape.vision, shape.text
    ids = {name: QWEN_WORDS + i for i, name in enumerate(QWEN_SPECIALS)}
    text = dict(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, num_hidden_layers=lm_layers, vocab_size=t.vocab_size,
        max_position_embeddings=32768, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": mrope_sections(t)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        depth=tower_layers, embed_dim=v.hidden_size, hidden_size=v.out_hidden_size, num_heads=v.num_heads,
        mlp_ratio=v.intermediate_size // v.hidden_size, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size, in_channels=3,
    )  # fmt: skip
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=t.tie_word_embeddings,
    )  # fmt: skip


def model_config(shape: ModelShape, lm_layers: int, tower_layers: int):
    return (llava_config if shape.family == "llava" else qwen2_vl_config)(shape, lm_layers, tower_layers)


def processor_for(shape: ModelShape):
    v = shape.vision
    if shape.family == "llava":
        return llava_processor(v.image_size, v.patch_size)
    return qwen2_vl_processor(v.patch_size, v.spatial_merge_size, v.temporal_patch_size)


def _random_model(config, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A model of ``config`` with transformers' own initialisation from ``seed``, stored in ``dtype``."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the storage dtype: half the peak memory of fp32
    try:
        model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _tower(model: torch.nn.Module) -> torch.nn.Module:
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def build_shape_member(recipe: ShapeRecipe, root: Path) -> dict:
    """Write ``device/`` (and ``teacher/``, same tower weights) under ``root``; returns the manifest."""
    seconds: dict[str, float] = {}
    parameters: dict[str, int] = {}
    tower_state = None
    members = [("device", recipe.device, recipe.device_dtype, recipe.seed)]
    if recipe.teacher is not None:
        members.append(("teacher", recipe.teacher, recipe.teacher_dtype, recipe.seed + 1))
    for member, shape, dtype, seed in members:
        t0 = time.perf_counter()
        model = _random_model(model_config(shape, recipe.lm_layers, recipe.tower_layers), getattr(torch, dtype), seed)
        if tower_state is None:
            tower_state = {k: v.clone() for k, v in _tower(model).state_dict().items()}
        else:  # the teacher shares the device's frozen vision tower, as LLaVA-1.5 7B and 13B do
            _tower(model).load_state_dict(tower_state)
        out = root / member
        model.generation_config.max_new_tokens = FAMILY_DEFAULT_MAX_NEW_TOKENS[shape.family]  # the agent's default
        model.save_pretrained(out)
        processor_for(shape).save_pretrained(out)
        parameters[member] = sum(p.numel() for p in model.parameters())
        seconds[member] = round(time.perf_counter() - t0, 1)
        del model
    return {
        "digest": recipe.digest(),
        "kind": "shape",
        "recipe": recipe.model_dump(),
        "seconds": seconds,
        "parameters": parameters,
        "max_new_tokens": FAMILY_DEFAULT_MAX_NEW_TOKENS[recipe.device.family],
    }


def shape_by_name(name: str, settings: list[str] | None = None) -> ShapeRecipe:
    """The named shape recipe with ``FIELD=JSON`` settings (``lm_layers``, ``tower_layers``, ``seed``, dtypes)."""
    if name not in SHAPES:
        raise ConfigError(f"unknown shape recipe {name!r}; known: {', '.join(SHAPES)}")
    updates: dict = {}
    for item in settings or []:
        field, sep, text = item.partition("=")
        if not sep or field not in ShapeRecipe.model_fields or field in ("device", "teacher", "name"):
            raise ConfigError(f"--set needs FIELD=VALUE with lm_layers, tower_layers, seed or a dtype; got {item!r}")
        try:
            updates[field] = json.loads(text)
        except json.JSONDecodeError:
            updates[field] = text
    try:
        return ShapeRecipe.model_validate(SHAPES[name]().model_dump() | updates)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"invalid shape setting {err['loc'][0]}: {err['msg']}") from None


def shape_root(recipe: ShapeRecipe, home: Path | None = None) -> Path:
    """Where the shape member is built (the zoo cache, outside the repository: never shipped)."""
    from sim.zoo.build import zoo_home

    return (home or zoo_home()) / f"{recipe.name}-{recipe.digest()}"


def ensure_shape(recipe: ShapeRecipe, home: Path | None = None, force: bool = False) -> Path:
    """The built shape member's root (``device/``, maybe ``teacher/``, ``zoo.json``), built when missing."""
    from sim.zoo.build import MANIFEST, _build_lock

    root = shape_root(recipe, home)
    with _build_lock(root):
        manifest = root / MANIFEST
        if manifest.is_file() and not force:
            try:
                if json.loads(manifest.read_text()).get("digest") == recipe.digest():
                    return root
            except json.JSONDecodeError:
                pass
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        built = build_shape_member(recipe, staging)
        (staging / MANIFEST).write_text(json.dumps(built, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return root
