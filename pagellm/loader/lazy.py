"""A checkpoint tensor not read yet: a tensor-parallel rank reads only its part of it.

`LazyTensor` wraps one safetensors entry (the file stays open while the loader iterates). It
offers what a layer needs to cut its shard, `shape`, `dim()` and `narrow()`, and `narrow` reads
only those rows or columns from the file (safetensors `get_slice`), so a rank's peak memory is
its shard plus one tensor's part, not the whole model. Anything else calls `materialize()`
(`pagellm.layers.utils.materialize`, duck-typed so the layers need not import the loader).
"""

from __future__ import annotations

import torch


class LazyTensor:
    def __init__(self, handle, name: str, dtype: torch.dtype) -> None:
        self._slice = handle.get_slice(name)
        self.name = name
        self.dtype = dtype
        self.shape = torch.Size(self._slice.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Reads only [start, start + length) along `dim` from the file."""
        index = tuple(slice(None) for _ in range(dim)) + (slice(start, start + length),)
        return self._slice[index].to(self.dtype)

    def materialize(self) -> torch.Tensor:
        return self._slice[:].to(self.dtype)
