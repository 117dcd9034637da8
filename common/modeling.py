"""Load LLaVA-style multimodal LLMs from a local directory or a hub id, optionally quantized with bitsandbytes.

The same code loads the zoo's tiny models and real checkpoints such as ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.errors import ModelLoadError

Quantization = Literal["none", "4bit", "8bit"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
# Modules kept in full precision when quantizing: the shared vision tower, the projector and the head.
KEEP_FULL_PRECISION = ["vision_tower", "multi_modal_projector", "lm_head"]


@dataclass
class LoadedMLLM:
    """A model and the processor that prepares its inputs."""

    model: Any
    processor: Any
    source: str


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source and source.count("/") != 1 or Path(source).exists()


def _check_directory(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config} is corrupt: {exc}") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has no weight files (*.safetensors)")


def quantization_config(quantization: Quantization, compute_dtype: DType = "float32"):
    """bitsandbytes config for 4-bit NF4 or 8-bit weights (None for full precision); ``compute_dtype`` is what
    NF4 layers compute in (float16 on a GPU, float32 on a CPU)."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype if compute_dtype != "auto" else "float32"),
            llm_int8_skip_modules=KEEP_FULL_PRECISION,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)
    raise ModelLoadError(f"unknown quantization {quantization!r}; use none, 4bit or 8bit")


def load_mllm(
    source: str | Path,
    *,
    quantization: Quantization = "none",
    device_map: str = "cpu",
    local_only: bool = False,
    dtype: DType = "auto",
) -> LoadedMLLM:
    """Load model and processor with ``from_pretrained`` from a directory or a hub id.

    ``dtype`` is the weights' dtype (``auto``: as stored); with 4-bit NF4 it is also the compute dtype.

    Raises ModelLoadError with a one-line reason for a missing or corrupt directory or an unknown id.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    src = str(source)
    if _looks_like_path(src):
        path = Path(src).expanduser()
        _check_directory(path)
        src = str(path)
        local_only = True
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    if dtype != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map=device_map)
    elif device_map != "cpu":
        kwargs["device_map"] = device_map  # straight onto the accelerator, without a CPU copy first
    try:
        model = AutoModelForImageTextToText.from_pretrained(src, **kwargs)
        processor = AutoProcessor.from_pretrained(src, local_files_only=local_only)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {src}: {reason}") from None
    model.eval()
    return LoadedMLLM(model=model, processor=processor, source=src)
