"""Gated activations over a merged [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.use_cpu_kernel = False  # set by enable_cpu_kernels(): one pass, no silu(gate) temporary

    def enable_cpu_kernel(self) -> None:
        self.use_cpu_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_cpu_kernel and x.is_contiguous():
            out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
            torch.ops.pagellm_cpu.silu_and_mul(out, x)
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
