"""The objects a load quantizes with: the checkpoint format or online method `quantization_rules`
chose, imported when used (`module:Class` below), so the front end never imports them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

from pagellm.layers.quantization.base import CheckpointFormat, OnlineQuantization
from pagellm.quantization_rules import choose_quantization

CHECKPOINT_FORMATS = MappingProxyType({
    "gptq": "pagellm.layers.quantization.gptq:GPTQFormat",
    "awq": "pagellm.layers.quantization.awq:AWQFormat",
    "compressed-tensors": "pagellm.layers.quantization.compressed_tensors:CompressedTensorsFormat",
    "fp8": "pagellm.layers.quantization.fp8:FP8Format",
})
ONLINE_METHODS = MappingProxyType({
    "fp8": "pagellm.layers.quantization.online:FP8OnlineQuantization",
    "int8": "pagellm.layers.quantization.online:Int8OnlineQuantization",
})


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class QuantizationPlan:
    method: str  # "none", "gguf", a checkpoint format or an online method
    checkpoint: Optional[CheckpointFormat] = None  # the format the safetensors tensors are in
    online: Optional[OnlineQuantization] = None  # quantizes dense linear weights after load
    dequantize: bool = False  # expand the checkpoint's quantized weights at load
    device: str = "cpu"  # a GGUF file keeps only the group GEMM's types on a GPU

    def describe(self) -> str:
        if self.dequantize:
            return f"{self.method} checkpoint, dequantized at load"
        if self.online is not None:
            return f"{self.method}, quantized online at load"
        return self.method


def plan_quantization(requested: str, source_kind: str, quantization_config=None,
                      device: str = "cpu") -> QuantizationPlan:
    """The plan for `--quantization requested` on a checkpoint of `source_kind` ("gguf" or "hf")."""
    choice = choose_quantization(requested, source_kind, quantization_config, device)
    if choice.kind == "online":
        return QuantizationPlan(choice.method, online=_load(ONLINE_METHODS[choice.method])())
    if choice.kind == "checkpoint":
        fmt = _load(CHECKPOINT_FORMATS[choice.method]).from_config(choice.config)
        return QuantizationPlan(choice.method, checkpoint=fmt, dequantize=choice.dequantize)
    return QuantizationPlan(choice.method, device=choice.device)
