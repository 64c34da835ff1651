"""Quantized weight formats as `LinearMethod`s (no new layer classes)."""

from pagellm.layers.quantization.gguf import GGUF_KERNEL_TYPES, GGUFLinearMethod, GGUFQuantizedTensor

__all__ = ["GGUF_KERNEL_TYPES", "GGUFLinearMethod", "GGUFQuantizedTensor"]
