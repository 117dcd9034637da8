"""Version 0's LoRA is the same bits on the device and the cloud whatever the base model's dtype or quantization."""

from __future__ import annotations

import copy

import torch
from agent_support import micro_zoo
from peft import get_peft_model_state_dict

from common.adapters import AdapterConfig, add_lora
from common.delta_codec import state_digest
from common.modeling import load_mllm
from device.agent.runtime import DeviceModel


def test_v0_adapter_is_the_same_in_fp32_fp16_and_bf16(tmp_path):
    zoo = micro_zoo(tmp_path / "zoo")
    base = load_mllm(zoo.device, dtype="float32").model
    states = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = DeviceModel(copy.deepcopy(base).to(dtype), load_mllm(zoo.device).processor, AdapterConfig())
        states.append(model.adapter_weights())
    assert all(s[k].dtype == torch.float32 for s in states for k in s)
    assert len({state_digest(s) for s in states}) == 1
    a_keys = [k for k in states[0] if "lora_A" in k]
    assert a_keys and all(states[0][k].abs().sum() > 0 for k in a_keys)  # A is random, B starts at zero
    assert all(states[0][k].abs().sum() == 0 for k in states[0] if "lora_B" in k)
    other = get_peft_model_state_dict(add_lora(copy.deepcopy(base), AdapterConfig(seed=1)))
    assert other.keys() == states[0].keys() and state_digest(other) != state_digest(states[0])
