"""RMSNorm, computed in float32 like the reference implementations."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.use_cpu_kernel = False  # set by enable_cpu_kernels(): one C++ pass instead of five torch ops

    def enable_cpu_kernel(self) -> None:
        self.use_cpu_kernel = True

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, adds it first and returns (normed, new residual), saving a pass over memory later.
        The C++ kernel writes the new residual into `residual` in place."""
        if self.use_cpu_kernel and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            out = torch.empty_like(x)
            if residual is None:
                torch.ops.pagellm_cpu.rms_norm(out, x, self.weight, self.eps)
                return out
            torch.ops.pagellm_cpu.fused_add_rms_norm(out, x, residual, self.weight, self.eps)
            return out, residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), and multiplies in float32 before casting back
    (Llama casts first), so the checkpoint's weights are zero-centred."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)
