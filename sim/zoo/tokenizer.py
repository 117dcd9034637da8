"""A word-level tokenizer and a LLaVA processor for the zoo, built with the real transformers classes."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sim.world.questions import ANSWERS, QUESTION_WORDS

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":")
# LLaVA-1.5's conversation format, for AutoProcessor.apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_for(question: str) -> str:
    """The LLaVA-1.5 prompt for one question (what the chat template yields with a generation prompt)."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over the world's vocabulary, with ``<image>`` as a special token."""
    words = list(dict.fromkeys(TEMPLATE_WORDS + QUESTION_WORDS + ANSWERS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=4096,
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    """LLaVA-1.5 style processor: CLIP normalisation, square image, CLS dropped from the visual tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
