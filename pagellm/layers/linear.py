"""Linear layers that know how to load their weights, including merged projections.

Merging q/k/v (and gate/up) into one matrix turns three matmuls into one; the loader
fills each shard from the checkpoint's separate tensors.

What the weight is and how the matmul runs is the layer's `LinearMethod` (see `linear_method.py`):
plain `F.linear` by default, oneDNN-prepacked on the CPU after `prepack_for_cpu()`. How the layer
is split across devices is its `ParallelStyle`; `checkpoint_shard` is where a tensor-parallel
layer will cut its part of a checkpoint tensor.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
from torch import nn

from pagellm.layers.linear_method import (  # noqa: F401  (re-exported: callers import them from here)
    CpuPackedLinearMethod,
    LinearMethod,
    UnquantizedLinearMethod,
    cpu_prepack_available,
    pack_weight_for_cpu,
    packed_linear,
)
from pagellm.layers.utils import call_on_layers


class ParallelStyle(enum.Enum):
    """How a layer's weight is split across tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds the whole weight
    COLUMN = "column"  # output features split across ranks
    ROW = "row"  # input features split across ranks (outputs summed)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel_style: ParallelStyle = ParallelStyle.REPLICATED,
                 method: Optional[LinearMethod] = None) -> None:
        super().__init__()
        if parallel_style is not ParallelStyle.REPLICATED:
            raise NotImplementedError(f"{parallel_style.name} linear layers are not implemented yet "
                                      "(only REPLICATED)")
        self.in_features = in_features
        self.out_features = out_features
        self.parallel_style = parallel_style
        self.method = method if method is not None else UnquantizedLinearMethod()
        self.method.create_weights(self, in_features, out_features, bias)
        self.packed: Optional[torch.Tensor] = None  # the oneDNN weight once prepacked (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def checkpoint_shard(self, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> torch.Tensor:
        """This rank's part of a checkpoint tensor; the whole tensor while layers are replicated.
        A COLUMN layer will narrow the output dim here, a ROW layer the input dim of the weight."""
        return tensor

    def load(self, name: str, tensor: torch.Tensor) -> None:
        self.method.load(self, name, self.checkpoint_shard(name, tensor))

    def process_after_loading(self) -> None:
        """The method's post-load step (none for plain weights)."""
        self.method.process_after_loading(self)

    def prepack_for_cpu(self) -> None:
        """Switches to the oneDNN-packed method: packs the loaded weight and drops the plain copy."""
        self.method = CpuPackedLinearMethod()
        self.method.process_after_loading(self)


class MergedLinear(Linear):
    """Several output projections stacked along the output dim, e.g. [q | k | v]."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 parallel_style: ParallelStyle = ParallelStyle.REPLICATED,
                 method: Optional[LinearMethod] = None) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias, parallel_style, method)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in shard_sizes.items():
            self.shard_offsets[shard] = (offset, size)
            offset += size

    def load_shard(self, shard: str, name: str, tensor: torch.Tensor) -> None:
        self.method.load(self, name, self.checkpoint_shard(name, tensor, shard), shard)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split([size for _, size in self.shard_offsets.values()], dim=-1)


def prepack_cpu_weights(model: nn.Module) -> int:
    """Prepacks every layer of `model` that supports it; returns how many were packed."""
    return call_on_layers(model, "prepack_for_cpu")
