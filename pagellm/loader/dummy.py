"""`load_format="dummy"`: random weights from config.json alone.

Lets large shapes (an 8B Llama) be benchmarked without checkpoint files. The values only need
to keep activations finite and of sensible size: matrices ~ N(0, std), norms at their identity
scale, biases 0.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pagellm.loader.source import ModelSource


def dummy_source(model: str) -> ModelSource:
    """A directory with a config.json is enough (weights files, if any, are ignored)."""
    path = os.path.abspath(os.path.expanduser(str(model)))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"load_format='dummy' needs a model directory with a config.json, got {str(model)!r}")
    return ModelSource(path=path, kind="hf")


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Fills every parameter in place (on whatever device it lives), deterministically from `seed`."""
    devices = {p.device for p in model.parameters()}
    generators = {d: torch.Generator(device=d).manual_seed(seed) for d in devices}
    # named_parameters() lists a tied LM head once, under the embedding.
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std, generator=generators[param.device])
        elif "norm" in name:
            # Norm scales keep their constructed identity value (1 for x * w, 0 for x * (1 + w) norms).
            continue
        else:
            param.zero_()  # biases
