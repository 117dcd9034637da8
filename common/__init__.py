"""Tandem: common package."""

import warnings

from common.modeling import hold_bitsandbytes_notices

# Before anything imports peft (which imports bitsandbytes even when nothing is quantized).
hold_bitsandbytes_notices()
# peft still calls transformers' deprecated is_gradient_checkpointing when it wraps a model (every agent start).
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
