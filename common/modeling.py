"""Load LLaVA-style multimodal LLMs from a local directory or a hub id, optionally quantized with bitsandbytes.

The same code loads the zoo's tiny models and real checkpoints such as ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.errors import ModelLoadError

Quantization = Literal["none", "4bit", "8bit"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
# Modules kept in full precision when quantizing: the shared vision tower, the projector and the head.
KEEP_FULL_PRECISION = ["vision_tower", "multi_modal_projector", "visual", "lm_head"]  # visual: Qwen2-VL's tower
# bitsandbytes 4-bit: absmax block size, and the row tile of its CPU kernel. On CPUs with AVX512-BF16,
# ``Linear4bit`` repacks its weight on the first forward, which needs in_features % 64 == 0 and
# out_features % 32 == 0 (bitsandbytes 0.50 ``_convert_weight_packed_for_cpu``); other layers fail there.
NF4_BLOCKSIZE = 64
NF4_ROW_TILE = 32


# bitsandbytes logs this on import on CPUs with AVX512-BF16 when the optional ``kernels`` package is missing.
# peft imports bitsandbytes whenever it is installed (``import peft``, and again when it builds LoRA layers),
# so every CLI start would print it although nothing is quantized. It is held back until quantization is
# asked for (``release_bitsandbytes_notices``), then shown.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_NOTICE = "Failed to load CPU gemm_4bit_forward"


class _HeldNotices(logging.Filter):
    """Holds bitsandbytes' optional-kernel notice instead of printing it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_BNB_NOTICE):
            self.held.append(record)
            return False
        return True


_held = _HeldNotices()


def hold_bitsandbytes_notices() -> None:
    """Hold bitsandbytes' import-time kernel notice until quantization is asked for (idempotent).

    Called from ``common/__init__.py``, so it is in place before anything imports peft or bitsandbytes.
    """
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if _held not in logger.filters:
        logger.addFilter(_held)


def release_bitsandbytes_notices() -> None:
    """Quantization was asked for: stop holding and show what was held (notices bitsandbytes logs once)."""
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    logger.removeFilter(_held)
    held, _held.held = _held.held, []
    for record in held:
        logger.handle(record)


@dataclass
class LoadedMLLM:
    """A model and the processor that prepares its inputs."""

    model: Any
    processor: Any
    source: str


@dataclass
class ImageTextProcessor:
    """An image processor and a tokenizer, for checkpoints whose ``AutoProcessor`` cannot be built here.

    Qwen2-VL's processor also holds a video processor, and transformers' video processors need torchvision,
    which these machines cannot install (stack notes). The agent needs only the two parts below.
    """

    image_processor: Any
    tokenizer: Any

    def save_pretrained(self, directory: str | Path) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def load_processor(src: str, local_only: bool):
    """``AutoProcessor``; where it needs a part this machine lacks (a video processor without torchvision),
    the checkpoint's image processor and tokenizer as an ``ImageTextProcessor``."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(src, local_files_only=local_only)
    except (AttributeError, ImportError, TypeError, ValueError) as exc:
        try:
            images = AutoImageProcessor.from_pretrained(src, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_only)
        except Exception:
            raise exc from None
        return ImageTextProcessor(image_processor=images, tokenizer=tokenizer)


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


def nf4_quantizable(in_features: int, out_features: int) -> bool:
    """Whether bitsandbytes can run a 4-bit NF4 layer of this shape on every backend (CPU included)."""
    return in_features % NF4_BLOCKSIZE == 0 and out_features % NF4_ROW_TILE == 0


def linear_shapes(source: str, local_only: bool) -> dict[str, tuple[int, int]]:
    """Full module name -> (in_features, out_features) of every ``nn.Linear`` of the model at ``source``.

    Built from the config alone on the meta device (no weights are read), so names are exactly those
    transformers gives the modules it will quantize.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def modules_to_keep(linears: dict[str, tuple[int, int]], quantization: Quantization) -> list[str]:
    """Full names of the modules to keep in full precision.

    The ``KEEP_FULL_PRECISION`` parts by their full path (transformers 5 matches skip names from the start of
    the module name or as a suffix, so a bare ``vision_tower`` no longer matches ``model.vision_tower.*``), and
    for 4-bit every other linear layer whose shape bitsandbytes cannot quantize (``nf4_quantizable``).
    """
    keep: set[str] = set()
    for name, (fan_in, fan_out) in linears.items():
        parts = name.split(".")
        hit = next((i for i, part in enumerate(parts) if part in KEEP_FULL_PRECISION), None)
        if hit is not None:
            keep.add(".".join(parts[: hit + 1]))
        elif quantization == "4bit" and not nf4_quantizable(fan_in, fan_out):
            keep.add(name)
    return sorted(keep)


def _kept(name: str, keep: list[str]) -> str | None:
    """The entry of ``keep`` that covers module ``name`` (itself or a parent), if any."""
    return next((k for k in keep if name == k or name.startswith(k + ".")), None)


def quantization_config(quantization: Quantization, keep: list[str] | None = None, compute_dtype: DType = "float32"):
    """bitsandbytes config for 4-bit NF4 or 8-bit weights (None for full precision).

    ``keep``: full names of modules left in full precision (``modules_to_keep``); default
    ``KEEP_FULL_PRECISION``.
    """
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        raise ModelLoadError(f"unknown quantization {quantization!r}; use none, 4bit or 8bit")
    release_bitsandbytes_notices()
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(keep) if keep is not None else list(KEEP_FULL_PRECISION)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype if compute_dtype != "auto" else "float32"),
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


@contextmanager
def _quiet_local_load(local: bool) -> Iterator[None]:
    """No "Loading weights" progress bar for a local directory (it loads in well under a second); a hub
    download keeps its bars."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if local:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and was_enabled:
            hf_logging.enable_progress_bar()


def load_mllm(
    source: str | Path,
    *,
    quantization: Quantization = "none",
    device_map: str = "cpu",
    local_only: bool = False,
    dtype: DType = "auto",
) -> LoadedMLLM:
    """Load model and processor with ``from_pretrained`` from a directory or a hub id.

    ``dtype`` is the weights' dtype (``auto``: as stored); with 4-bit NF4 it is also the compute dtype (float16 on
    a GPU). A ``device_map`` other than ``cpu`` loads straight onto that device.

    Raises ModelLoadError with a one-line reason for a missing or corrupt directory or an unknown id.
    """
    from transformers import AutoModelForImageTextToText

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
    if quantization not in ("none", "4bit", "8bit"):
        raise ModelLoadError(f"unknown quantization {quantization!r}; use none, 4bit or 8bit")
    try:
        if quantization != "none":
            linears = linear_shapes(src, local_only)
            keep = modules_to_keep(linears, quantization)
            if not any(_kept(name, keep) is None for name in linears):
                raise ModelLoadError(
                    f"no linear layer of {src} can be quantized to {quantization} (4-bit needs in_features % "
                    f"{NF4_BLOCKSIZE} == 0 and out_features % {NF4_ROW_TILE} == 0); load it with quantization none"
                )
            qconfig = quantization_config(quantization, keep, dtype)
            kwargs.update(quantization_config=qconfig, device_map=device_map)
        elif device_map != "cpu":
            kwargs["device_map"] = device_map  # straight onto the accelerator, without a CPU copy first
        with _quiet_local_load(local_only):
            model = AutoModelForImageTextToText.from_pretrained(src, **kwargs)
        processor = load_processor(src, local_only)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {src}: {reason}") from None
    model.eval()
    return LoadedMLLM(model=model, processor=processor, source=src)
