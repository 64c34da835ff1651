"""Online 8-bit quantization of a full-precision checkpoint at load (`--quantization int8 | fp8`).

Each dense linear weight (the LM head and embeddings stay as they are) is quantized per output
channel, symmetric, once its checkpoint tensors are loaded:
- int8: codes in [-127, 127] with scale amax / 127 per row; activations are quantized per token
  at run time (W8A8, int32 dots).
- fp8: e4m3 codes with scale amax / 448 per row; on CUDA the activations get dynamic per-token
  FP8 scales (rowwise torch._scaled_mm), on the CPU they stay float and the FP8 weight kernel
  expands the codes.
"""

from __future__ import annotations

import torch

from pagellm.layers.quantization.base import OnlineQuantization, QuantizedWeight
from pagellm.layers.quantization.w8 import FP8_MAX, FP8Weight, Int8Weight


def _row_scales(weight: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 weight and its per-row scales amax / qmax (1 for an all-zero row)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    return w, torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


class Int8OnlineQuantization(OnlineQuantization):
    name = "int8"

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        w, scale = _row_scales(weight, 127.0)
        codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return Int8Weight(codes, scale, activation="dynamic")


class FP8OnlineQuantization(OnlineQuantization):
    name = "fp8"

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        w, scale = _row_scales(weight, FP8_MAX)
        codes = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return FP8Weight(codes, scale, activation="dynamic")
