"""Which quantization a load uses: `--quantization` against what the checkpoint says it is.

Pure rules on names (no torch, no layers), so the front end can check them at start-up and a
mismatch fails before any worker starts; `layers/quantization/registry.py` turns the choice into
the format and method objects a worker loads with.

A safetensors checkpoint names its format in config.json's `quantization_config.quant_method`;
a GGUF file is quantized by its tensors' block types.

- auto: what the checkpoint is (GGUF blocks — on a GPU only the types the group GEMM takes —, or
  its quant_method); a plain checkpoint loads in full precision.
- none: everything dequantized at load (the fp32 parity tests' reference).
- a format name (gguf, gptq, awq, compressed-tensors, fp8): must be what the checkpoint is.
- fp8 / int8 on a full-precision checkpoint: quantized online, at load (W8A8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_NAMES = ("gptq", "awq", "compressed-tensors", "fp8")
ONLINE_METHOD_NAMES = ("fp8", "int8")


@dataclass(frozen=True)
class QuantizationChoice:
    method: str  # "none", "gguf", a checkpoint format or an online method
    kind: str  # "none" | "gguf" | "checkpoint" | "online"
    dequantize: bool = False  # a quantized checkpoint expanded at load (--quantization none)
    config: Optional[dict] = None  # the checkpoint's quantization_config, as a dict
    device: str = "cpu"  # where the weights compute (a GGUF file keeps fewer types off the CPU)


def quantization_config_dict(quantization_config) -> Optional[dict]:
    if quantization_config is None or isinstance(quantization_config, dict):
        return quantization_config
    return quantization_config.to_dict()


def checkpoint_quant_method(quantization_config) -> Optional[str]:
    """The normalized `quant_method` of a config's `quantization_config` (None when absent)."""
    config = quantization_config_dict(quantization_config)
    if config is None:
        return None
    method = config.get("quant_method")
    if not isinstance(method, str) or not method:
        raise ValueError(f"config.json's quantization_config has no quant_method: {config}")
    return method.lower().replace("_", "-")


def choose_quantization(requested: str, source_kind: str, quantization_config=None,
                        device: str = "cpu") -> QuantizationChoice:
    """The choice for `--quantization requested` on a checkpoint of `source_kind` ("gguf" or "hf")."""
    if source_kind == "gguf":
        if requested not in ("auto", "gguf", "none"):
            raise ValueError(f"--quantization {requested}: a GGUF file is quantized by its own block types; "
                             "use auto (keep them) or none (dequantize at load)")
        if requested == "none":
            return QuantizationChoice("none", "none")
        if device != "cpu":
            logger.info("GGUF on %s: Q4_0/Q4_1/Q8_0 linear weights stay quantized (Triton group GEMM); other "
                        "types, the embedding and the LM head are dequantized at load", device)
        return QuantizationChoice("gguf", "gguf", device=device)
    method = checkpoint_quant_method(quantization_config)
    if method is None:
        if requested in ("auto", "none"):
            return QuantizationChoice("none", "none")
        if requested in ONLINE_METHOD_NAMES:
            return QuantizationChoice(requested, "online")
        raise ValueError(f"--quantization {requested}: the checkpoint is not quantized (its config.json has no "
                         f"quantization_config); online quantization of a full-precision checkpoint: "
                         f"{', '.join(ONLINE_METHOD_NAMES)}")
    if method not in CHECKPOINT_FORMAT_NAMES:
        raise ValueError(f"the checkpoint's quantization_config.quant_method is {method!r}, which is not supported; "
                         f"supported checkpoint formats: {', '.join(CHECKPOINT_FORMAT_NAMES)}")
    if requested not in ("auto", "none", method):
        raise ValueError(f"--quantization {requested} does not match the checkpoint, which is quantized with "
                         f"{method} (config.json quantization_config); use auto or {method}, or none to dequantize")
    return QuantizationChoice(method, "checkpoint", dequantize=requested == "none",
                              config=quantization_config_dict(quantization_config))
