"""FP8 checkpoints (`quantization_config.quant_method: "fp8"`, as written by AutoFP8, llm-compressor's
"fp8" export and DeepSeek-style block-quantized models).

A quantized layer is `<prefix>.weight` in float8_e4m3fn with either
- `<prefix>.weight_scale`: one float per tensor, or one per output row (per channel), or
- `<prefix>.weight_scale_inv` with `weight_block_size: [bn, bk]` in the config: one float per
  bn x bk block, (ceil(N/bn), ceil(K/bk)) (despite the name, the dequantized weight is code * scale);
and, with `activation_scheme: "static"`, `<prefix>.input_scale` (one float per tensor).
"""

from __future__ import annotations

from typing import Optional

import torch

from pagellm.layers.quantization.base import CheckpointFormat, QuantizedWeight
from pagellm.layers.quantization.w8 import FP8Weight

ACTIVATION_SCHEMES = ("dynamic", "static")


def block_size_from(value, setting: str) -> Optional[tuple[int, int]]:
    """A [rows, cols] block size from a config value (None when absent)."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"quantization_config.{setting} must be two positive integers [rows, cols], got {value!r}")
    return int(value[0]), int(value[1])


class FP8Format(CheckpointFormat):
    name = "fp8"

    def __init__(self, activation_scheme: str = "dynamic", block: Optional[tuple[int, int]] = None) -> None:
        self.activation_scheme = activation_scheme
        self.block = block

    @classmethod
    def from_config(cls, config: dict) -> "FP8Format":
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported for fp8; "
                             f"supported: {', '.join(ACTIVATION_SCHEMES)}")
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt {fmt!r} is not supported for fp8; supported: e4m3")
        block = block_size_from(config.get("weight_block_size"), "weight_block_size")
        if block is not None and scheme == "static":
            raise ValueError("quantization_config: block-quantized fp8 (weight_block_size) needs "
                             "activation_scheme dynamic, not static")
        return cls(scheme, block)

    def marker_suffixes(self) -> tuple[str, ...]:
        return ("weight_scale", "weight_scale_inv")

    def part_suffixes(self) -> tuple[str, ...]:
        return ("weight", "weight_scale", "weight_scale_inv", "input_scale")

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        weight = parts.get("weight")
        if weight is None:
            raise ValueError("has scales but no weight tensor")
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight is {weight.dtype}; an fp8 checkpoint stores float8_e4m3fn weights")
        if self.block is not None:
            if "weight_scale_inv" not in parts:
                raise ValueError(f"weight_block_size is {list(self.block)} but there is no weight_scale_inv tensor")
            scale = parts["weight_scale_inv"]
        else:
            if "weight_scale" not in parts:
                raise ValueError("has weight_scale_inv (block scales) but config.json's quantization_config "
                                 "has no weight_block_size")
            scale = parts["weight_scale"]
        input_scale = None
        if self.activation_scheme == "static":
            if "input_scale" not in parts:
                raise ValueError("activation_scheme is static but there is no input_scale tensor")
            input_scale = parts["input_scale"].float().amax()  # one per tensor (some writers store (1,))
        return FP8Weight(weight, scale, self.block, self.activation_scheme, input_scale)
