"""Linear layers that know how to load their weights, including merged projections.

Merging q/k/v (and gate/up) into one matrix turns three matmuls into one; the loader
fills each shard from the checkpoint's separate tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, name: str, tensor: torch.Tensor) -> None:
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
