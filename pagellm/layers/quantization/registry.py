"""Which quantization a load uses: `--quantization` against what the checkpoint says it is.

A safetensors checkpoint names its format in config.json's `quantization_config.quant_method`;
a GGUF file is quantized by its tensors' block types. `plan_quantization` is the one owner of
the rules (the front end calls it at start-up so a mismatch fails before any worker starts; each
worker calls it again to load):

- auto: what the checkpoint is (GGUF blocks on the CPU, or its quant_method); a plain checkpoint
  loads in full precision.
- none: everything dequantized at load (the fp32 parity tests' reference).
- a format name (gguf, gptq, awq, compressed-tensors, fp8): must be what the checkpoint is.
- fp8 / int8 on a full-precision checkpoint: quantized online, at load (W8A8).

Formats are imported when used (`module:Class` below), so the front end stays light.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

from pagellm.layers.quantization.base import CheckpointFormat, OnlineQuantization

logger = logging.getLogger(__name__)

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

    def describe(self) -> str:
        if self.dequantize:
            return f"{self.method} checkpoint, dequantized at load"
        if self.online is not None:
            return f"{self.method}, quantized online at load"
        return self.method


def checkpoint_quant_method(quantization_config) -> Optional[str]:
    """The normalized `quant_method` of a config's `quantization_config` (None when absent)."""
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    method = quantization_config.get("quant_method")
    if not isinstance(method, str) or not method:
        raise ValueError(f"config.json's quantization_config has no quant_method: {quantization_config}")
    return method.lower().replace("_", "-")


def plan_quantization(requested: str, source_kind: str, quantization_config=None,
                      device: str = "cpu") -> QuantizationPlan:
    """The plan for `--quantization requested` on a checkpoint of `source_kind` ("gguf" or "hf")."""
    if source_kind == "gguf":
        if requested not in ("auto", "gguf", "none"):
            raise ValueError(f"--quantization {requested}: a GGUF file is quantized by its own block types; "
                             "use auto (keep them) or none (dequantize at load)")
        if requested == "none":
            return QuantizationPlan("none")
        if device != "cpu":  # the GGUF kernels are CPU kernels
            logger.info("GGUF weights are dequantized at load on %s (the block kernels are CPU kernels)", device)
            return QuantizationPlan("none")
        return QuantizationPlan("gguf")
    method = checkpoint_quant_method(quantization_config)
    if method is None:
        if requested in ("auto", "none"):
            return QuantizationPlan("none")
        if requested in ONLINE_METHODS:
            return QuantizationPlan(requested, online=_load(ONLINE_METHODS[requested])())
        raise ValueError(f"--quantization {requested}: the checkpoint is not quantized (its config.json has no "
                         f"quantization_config); online quantization of a full-precision checkpoint: "
                         f"{', '.join(ONLINE_METHODS)}")
    if method not in CHECKPOINT_FORMATS:
        raise ValueError(f"the checkpoint's quantization_config.quant_method is {method!r}, which is not supported; "
                         f"supported checkpoint formats: {', '.join(CHECKPOINT_FORMATS)}")
    if requested not in ("auto", "none", method):
        raise ValueError(f"--quantization {requested} does not match the checkpoint, which is quantized with "
                         f"{method} (config.json quantization_config); use auto or {method}, or none to dequantize")
    config = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    fmt = _load(CHECKPOINT_FORMATS[method]).from_config(config)
    return QuantizationPlan(method, checkpoint=fmt, dequantize=requested == "none")
