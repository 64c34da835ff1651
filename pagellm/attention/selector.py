"""Which attention backend a run uses: `attention_backend` from the config, and the device."""

from __future__ import annotations

import importlib.util
import os

import torch

from pagellm.attention.backend import AttentionBackend
from pagellm.attention.torch_backend import TorchAttentionBackend


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on the CPU (slowly): how the kernels are tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend_name(requested: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when Triton is installed, else 'torch'; a forced choice is checked."""
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"EngineConfig.attention_backend: must be 'auto', 'torch' or 'triton', got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if not triton_importable():
        raise ValueError("EngineConfig.attention_backend: 'triton' was asked for but the triton package is not "
                         "installed (pip install triton), or use attention_backend='torch'")
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(f"EngineConfig.attention_backend: 'triton' needs a CUDA device, got device {device.type!r}; "
                         "use attention_backend='torch' (or set TRITON_INTERPRET=1 to run the kernels "
                         "through Triton's CPU interpreter, which is for tests only)")
    return "triton"


def select_attention_backend(requested: str, device: torch.device) -> AttentionBackend:
    if resolve_backend_name(requested, device) == "torch":
        return TorchAttentionBackend()
    # Imported here: importing triton on a CPU-only run costs time and is never needed.
    from pagellm.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)
