"""Which attention backend a run uses: `attention_backend` from the config, and the device."""

from __future__ import annotations

import importlib.util
import os

import torch

from pagellm.attention.backend import AttentionBackend
from pagellm.attention.cpu_backend import CpuAttentionBackend
from pagellm.attention.torch_backend import TorchAttentionBackend
from pagellm.ops.cpu import load_cpu_ops


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on the CPU (slowly): how the kernels are tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend_name(requested: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when Triton is installed, 'cpu' on the CPU when the C++ kernels
    build, else 'torch'; a forced choice is checked."""
    if requested not in ("auto", "torch", "triton", "cpu"):
        raise ValueError("EngineConfig.attention_backend: must be 'auto', 'torch', 'triton' or 'cpu', "
                         f"got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if device.type == "cuda":
            return "triton" if triton_importable() else "torch"
        return "cpu" if load_cpu_ops() else "torch"
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"EngineConfig.attention_backend: 'cpu' runs on the CPU only, got device {device.type!r}")
        if not load_cpu_ops():
            raise ValueError("EngineConfig.attention_backend: 'cpu' needs the C++ kernels, which failed to build "
                             "(see the warning above); use attention_backend='torch'")
        return "cpu"
    if not triton_importable():
        raise ValueError("EngineConfig.attention_backend: 'triton' was asked for but the triton package is not "
                         "installed (pip install triton), or use attention_backend='torch'")
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(f"EngineConfig.attention_backend: 'triton' needs a CUDA device, got device {device.type!r}; "
                         "use attention_backend='torch' (or set TRITON_INTERPRET=1 to run the kernels "
                         "through Triton's CPU interpreter, which is for tests only)")
    return "triton"


def select_attention_backend(requested: str, device: torch.device) -> AttentionBackend:
    name = resolve_backend_name(requested, device)
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        return CpuAttentionBackend()
    # Imported here: importing triton on a CPU-only run costs time and is never needed.
    from pagellm.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)
