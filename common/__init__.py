"""Tandem: common package."""

from common.modeling import hold_bitsandbytes_notices

# Before anything imports peft (which imports bitsandbytes even when nothing is quantized).
hold_bitsandbytes_notices()
