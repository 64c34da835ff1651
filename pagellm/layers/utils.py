"""Helpers over a built model's layers."""

from __future__ import annotations

from torch import nn


def call_on_layers(model: nn.Module, method: str) -> int:
    """Calls `method()` on every submodule that defines it (a per-layer switch such as
    prepacking or a kernel choice); returns how many layers it reached."""
    layers = [m for m in model.modules() if callable(getattr(m, method, None))]
    for layer in layers:
        getattr(layer, method)()
    return len(layers)


def materialize(tensor):
    """A checkpoint tensor read whole: a lazy one (`pagellm.loader.lazy.LazyTensor`, which only
    tensor-parallel layers cut without reading all of it) is read here; any other is returned as is."""
    read = getattr(tensor, "materialize", None)
    return read() if read is not None else tensor
