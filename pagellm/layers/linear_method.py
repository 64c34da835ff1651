"""How a linear layer holds and applies its weight: the `LinearMethod` seam.

A layer (`Linear`, `MergedLinear`, the LM head) owns its parameters; its method decides what they
are (`create_weights`), how checkpoint tensors land in them (`load`), what happens once loading is
done (`process_after_loading`) and how the matmul runs (`apply`). Quantized weights or LoRA are new
methods, not new layer classes.

On the CPU the weights can be packed once into oneDNN's blocked layout (`CpuPackedLinearMethod`):
torch's `F.linear` goes to MKL, which repacks the weight on every call and is slow at the small
row counts of decode steps (measured 1.3-2.5x slower at 16-64 rows, the LM head worst). The packed
matmul is the same fp32/bf16 arithmetic, only summed in another order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks its blocking from the expected row count; 64 (a typical decode batch) measured
# as fast as the exact count at every size from 16 to 8192 rows.
PACKING_ROWS_HINT = 64


def cpu_prepack_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN present, and able to pack this dtype on this CPU (bf16 needs AVX-512, fp16 AVX512-FP16)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


def pack_weight_for_cpu(weight: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN copy of an (out, in) weight, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class LinearMethod:
    """The interface; a layer calls these with itself as `layer`."""

    prepackable = True  # whether `prepack_for_cpu()` may replace it with the oneDNN-packed method

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        raise NotImplementedError

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> None:
        """Copies a checkpoint tensor into `layer.<name>`; `shard` names a slice of a merged layer."""
        raise NotImplementedError

    def process_after_loading(self, layer: nn.Module) -> None:
        """Runs once after every tensor is loaded (repacking, quantization scales, ...)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        """`x @ weight.T (+ bias)`; a row-parallel layer skips the bias and adds it after the all-reduce."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """A plain (out, in) weight and optional bias, applied with `F.linear`."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> None:
        param = layer.weight if name == "weight" else layer.bias
        if shard is None:
            if param is None or param.shape != tensor.shape:
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, expected "
                                 f"{None if param is None else tuple(param.shape)}")
            param.data.copy_(tensor)
            return
        offset, size = layer.shard_offsets[shard]
        if param is None:
            raise ValueError(f"unexpected {name} for shard {shard}")
        target = param.data.narrow(0, offset, size)
        if target.shape != tensor.shape:
            raise ValueError(f"shard {shard}.{name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)

    def apply(self, layer: nn.Module, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        return F.linear(x, layer.weight, None if skip_bias else getattr(layer, "bias", None))


class CpuPackedLinearMethod(UnquantizedLinearMethod):
    """The weight in oneDNN's packed layout (`layer.packed`), packed once after loading.

    The plain copy is dropped (packing keeps no second copy) unless `keep_plain`: a tied LM head
    shares its weight with the embedding lookup, which still needs it.
    """

    def __init__(self, keep_plain: bool = False) -> None:
        self.keep_plain = keep_plain

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> None:
        raise RuntimeError("weights cannot be loaded after prepack_for_cpu()")

    def process_after_loading(self, layer: nn.Module) -> None:
        layer.packed = pack_weight_for_cpu(layer.weight)
        if not self.keep_plain:
            layer.weight = None

    def apply(self, layer: nn.Module, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        return packed_linear(x, layer.packed, None if skip_bias else getattr(layer, "bias", None))
