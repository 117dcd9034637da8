"""Build zoo members as real ``LlavaForConditionalGeneration`` models (CLIP vision, Llama text)."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from sim.zoo.recipe import TextSpec, VisionSpec


def vision_config(spec: VisionSpec) -> CLIPVisionConfig:
    """CLIP vision config with LLaVA-1.5 geometry (square image, patch grid)."""
    return CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        projection_dim=spec.hidden_size,
        hidden_act="quick_gelu",
    )


def llava_config(vision: VisionSpec, text: TextSpec, vocab_size: int, image_token_id: int, pad_id: int) -> LlavaConfig:
    """LLaVA-1.5 config: features from vision layer -2, CLS dropped, 2-layer GELU projector."""
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        max_position_embeddings=2048,
        pad_token_id=pad_id,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config(vision),
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=vision.num_patches,
        pad_token_id=pad_id,
    )


def build_llava(vision: VisionSpec, text: TextSpec, vocab_size: int, image_token_id: int, pad_id: int, seed: int):
    """A freshly initialised LLaVA model of the given sizes."""
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(vision, text, vocab_size, image_token_id, pad_id))
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = 3
    return model
