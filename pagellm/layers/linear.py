"""Linear layers that know how to load their weights, including merged projections.

Merging q/k/v (and gate/up) into one matrix turns three matmuls into one; the loader
fills each shard from the checkpoint's separate tensors.

On the CPU the weights can be packed once into oneDNN's blocked layout (`prepack_for_cpu`):
torch's `F.linear` goes to MKL, which repacks the weight on every call and is slow at the
small row counts of decode steps (measured 1.3-2.5x slower at 16-64 rows, the LM head worst).
The packed matmul is the same fp32/bf16 arithmetic, only summed in another order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers.utils import call_on_layers

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


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed: Optional[torch.Tensor] = None  # the oneDNN weight once prepacked (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def prepack_for_cpu(self) -> None:
        """Packs the loaded weight and drops the plain copy (packing keeps no second copy)."""
        self.packed = pack_weight_for_cpu(self.weight)
        self.weight = None

    def _check_loadable(self) -> None:
        if self.packed is not None:
            raise RuntimeError("weights cannot be loaded after prepack_for_cpu()")

    def load(self, name: str, tensor: torch.Tensor) -> None:
        self._check_loadable()
        param = self.weight if name == "weight" else self.bias
        if param is None or param.shape != tensor.shape:
            raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, expected "
                             f"{None if param is None else tuple(param.shape)}")
        param.data.copy_(tensor)


class MergedLinear(Linear):
    """Several output projections stacked along the output dim, e.g. [q | k | v]."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in shard_sizes.items():
            self.shard_offsets[shard] = (offset, size)
            offset += size

    def load_shard(self, shard: str, name: str, tensor: torch.Tensor) -> None:
        self._check_loadable()
        offset, size = self.shard_offsets[shard]
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"unexpected {name} for shard {shard}")
        target = param.data.narrow(0, offset, size)
        if target.shape != tensor.shape:
            raise ValueError(f"shard {shard}.{name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split([size for _, size in self.shard_offsets.values()], dim=-1)


def prepack_cpu_weights(model: nn.Module) -> int:
    """Prepacks every layer of `model` that supports it; returns how many were packed."""
    return call_on_layers(model, "prepack_for_cpu")
